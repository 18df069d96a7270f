"""The C2R fine-tuning workflow from a HuggingFace model, as the C2R paper ran it on existing MoE
checkpoints: tiny HF Qwen3-MoE -> import-hf -> profile -> plan-placement -> apply-placement ->
a few iterations with C2R + dedup -> export-hf -> loads in transformers (trust_remote_code)
and generates text, with Megatron's logits (2 CPU gloo ranks, EP=2)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import _free_port
from hf_helpers import REPO, cli, megatron_vs_hf
from test_hf_import import make_hf

pytest.importorskip("transformers")
pytestmark = pytest.mark.dist

RUN = ["--seq-length", "64", "--mock-data", "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
       "--moe-token-dispatcher-type", "alltoall"]


def _pretrain(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "megatron_moe_ext.training.pretrain_gpt", "--cpu", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_c2r_workflow_from_a_huggingface_model(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_hf("qwen3", tmp_path / "src")
    imported = tmp_path / "imported"
    p = cli("import-hf", "--hf", str(src), "--out", str(imported), "--expert-model-parallel-size", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    model = shlex.split((imported / "megatron_flags.txt").read_text())

    prof = tmp_path / "prof"
    p = cli("profile", "--cpu", "--nproc", "2", "--output", str(prof), "--", *model, *RUN, "--load",
            str(imported), "--eval-iters", "2", "--train-iters", "1", "--eval-interval", "1", timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert json.loads((prof / "profile.json").read_text())["tokens"] > 0

    plan = tmp_path / "plan.json"
    p = cli("plan-placement", "--profile", str(prof), "--ep", "2", "--top-t", "1", "--co-resident-only",
            "--output", str(plan))
    assert p.returncode == 0, p.stderr[-2000:]
    placed = tmp_path / "placed"
    p = cli("apply-placement", "--load", str(imported), "--plan", str(plan), "--save", str(placed))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    trained = tmp_path / "trained"
    c2r = ["--moe-router-policy", "c2r", "--moe-c2r-plan", str(plan), "--moe-dedup-dispatch"]
    log = tmp_path / "c2r.jsonl"
    _pretrain(*model, *RUN, *c2r, "--load", str(placed), "--finetune", "--no-load-optim", "--no-load-rng",
              "--train-iters", "3", "--lr", "1e-4", "--log-interval", "1", "--eval-interval", "100",
              "--eval-iters", "0", "--save", str(trained), "--save-interval", "3", "--moe-ext-run-log", str(log))
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"train"' in line]
    assert rows and all(r["moe_ext/rows_per_token"] == 1.0 for r in rows)  # one rank per token

    hf = tmp_path / "hf"
    p = cli("export-hf", "--load", str(trained), "--out", str(hf), "--dtype", "fp32")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "MoeExtQwen3MoeForCausalLM" in p.stdout
    # the check builds Megatron at EP=1: the plan's partners keep their EP=2 layout
    r = megatron_vs_hf(tmp_path, model + c2r + ["--moe-c2r-layout-ep", "2"], trained / "iter_0000003", hf)
    assert r["hf_class"] == "MoeExtQwen3MoeForCausalLM" and r["rel_fro"] < 1e-4, r

    loaded = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    with torch.no_grad():
        out = loaded.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
