"""Bad input never costs a run (issue 14), through the real pretrain entry and real checkpoints:
refusals are one sentence, last on stderr and before Megatron's argument dump, with no traceback;
checkpoints carry their routing policy so a mismatch is named at start; inputs are not modified."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pretrain_cpu, pretrain_cpu_cmd, tree_hash

from megatron_moe_ext.cli import main

# the brief's tiny model, one process
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--num-experts", "4", "--moe-router-topk", "2",
        "--micro-batch-size", "1", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID")


def _entry(*argv, timeout=300) -> subprocess.CompletedProcess:
    """`megatron-moe-ext pretrain ARGV` in one process, as a user types it: no launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_moe_ext.cli", "pretrain", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _one_sentence_refusal(proc, *needles) -> str:
    """Exit 2, no traceback, no argument dump, and the refusal is the last stderr line."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "------------------------ arguments" not in proc.stdout, "refusal after the dump"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-moe-ext pretrain: error: "), last
    for n in needles:
        assert n in last, last
    return last


# --- 9, 10, 11: the one-process entry ------------------------------------------------------------

def test_pretrain_help_prints_megatron_and_plugin_flags():
    proc = _entry("--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--moe-paged-stash-buffer-size-factor-cuda" in proc.stdout  # the help with "10%)"
    assert "megatron-moe-ext:" in proc.stdout and "--moe-router-policy {topk,c2r,locmoe,locmoe-plus}" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only machines")
def test_pretrain_without_cpu_on_a_cpu_only_machine_names_cpu(tmp_path):
    proc = _entry(*TINY, "--train-iters", "1", "--save", str(tmp_path / "ckpt"), "--save-interval", "1")
    last = _one_sentence_refusal(proc, "--cpu")
    assert "Transformer Engine" not in proc.stderr, last
    assert not (tmp_path / "ckpt").exists()


def test_one_process_entry_starts_without_launcher_variables(tmp_path):
    log = tmp_path / "run.jsonl"
    # --disable-bias-linear: Megatron 0.19's SequentialMLP with biases fails in autograd at TP=1
    proc = _entry("--cpu", *TINY, "--disable-bias-linear", "--train-iters", "2", "--lr", "1e-3",
                  "--eval-interval", "2", "--eval-iters", "1", "--moe-ext-run-log", str(log))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [r for r in log.read_text().splitlines() if '"kind": "train"' in r]


def test_a_bad_output_path_is_refused_before_megatron_prints_its_arguments(tmp_path):
    """--moe-ext-run-log naming a folder used to crash at iteration 1; now it never starts."""
    run_log = tmp_path / "logs"
    run_log.mkdir()
    proc = _entry("--cpu", *TINY, "--train-iters", "2", "--lr", "1e-3", "--moe-ext-run-log", str(run_log),
                  "--save", str(tmp_path / "ckpt"), "--save-interval", "1")
    _one_sentence_refusal(proc, "--moe-ext-run-log", str(run_log))
    assert not (tmp_path / "ckpt").exists() and not any(run_log.iterdir())


# --- 8: routing policy and checkpoint; 11/12: apply-placement on real checkpoints -------------

@pytest.fixture(scope="module")
def topk_ckpt(tmp_path_factory):
    """A top-k checkpoint of the tiny EP=2 model (2 gloo ranks, 2 iterations)."""
    tmp = tmp_path_factory.mktemp("topk")
    pretrain_cpu(tmp, tmp / "ckpt", tmp / "run.jsonl", train_iters=2)
    return tmp / "ckpt"


def _entry_from(ckpt: Path, *extra) -> subprocess.CompletedProcess:
    """The entry in one process with the checkpoint's model flags (EP 1: refusals come first)."""
    cmd = pretrain_cpu_cmd(ckpt, ckpt.parent / "x.jsonl")
    flags = cmd[cmd.index("--cpu") + 1:]
    return _entry("--cpu", *flags, "--expert-model-parallel-size", "1", *extra)


@pytest.mark.dist
def test_checkpoints_carry_their_routing_policy(topk_ckpt, tmp_path):
    before = tree_hash(topk_ckpt)
    # C2R warm-up needs learned partners the top-k checkpoint does not have: named, not a KeyError
    proc = _entry_from(topk_ckpt, "--moe-router-policy", "c2r", "--moe-c2r-warmup-steps", "2")
    _one_sentence_refusal(proc, f"--load {topk_ckpt}", "C2R warm-up state", "topk", "--moe-c2r-plan")

    # the documented switch: C2R (default partners or a plan) from a top-k checkpoint, with a note
    c2r_ckpt = tmp_path / "c2r"
    proc = pretrain_cpu(tmp_path, topk_ckpt, tmp_path / "c2r.jsonl", "--save", str(c2r_ckpt),
                        "--moe-router-policy", "c2r", "--override-opt_param-scheduler", train_iters=3)
    assert "trained with --moe-router-policy topk; this run continues its weights with c2r" in proc.stderr
    assert (c2r_ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert tree_hash(topk_ckpt) == before, "the loaded checkpoint is not modified"

    # a C2R checkpoint resumed without --moe-router-policy c2r: refused, unless --finetune
    proc = _entry_from(c2r_ckpt)
    _one_sentence_refusal(proc, f"--load {c2r_ckpt}", "trained with --moe-router-policy c2r",
                          "but this run uses topk", "--finetune")


@pytest.mark.dist
def test_apply_placement_refuses_a_truncated_shard_and_a_save_inside_load(topk_ckpt, tmp_path, capsys):
    import torch

    from megatron_moe_ext.files.plan import Plan, save_plan

    plan = save_plan(tmp_path / "plan.json",
                     Plan(4, 2, 1, True, {1: torch.tensor([1, 0, 2, 3]), 2: torch.arange(4)},
                          {1: torch.tensor([[1], [0], [3], [2]]), 2: torch.tensor([[1], [0], [3], [2]])}),
                     report={}, profile="-")
    broken = tmp_path / "broken"
    shutil.copytree(topk_ckpt, broken)
    shard = max((broken / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before, before_src = tree_hash(broken), tree_hash(topk_ckpt)

    rc = main(["apply-placement", "--load", str(broken), "--plan", str(plan), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "cannot be read" in err and "truncated" in err, err
    assert not (tmp_path / "out").exists() and tree_hash(broken) == before

    rc = main(["apply-placement", "--load", str(topk_ckpt), "--plan", str(plan),
               "--save", str(topk_ckpt / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and "inside the input checkpoint" in err, err
    assert tree_hash(topk_ckpt) == before_src
