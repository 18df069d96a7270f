"""import-hf: tiny HF Qwen3-MoE, Qwen2-MoE and Mixtral models (built by transformers from a config
with random weights, no downloads) -> Megatron torch_dist checkpoints: Megatron's logits equal
HF's (float32, 1e-4 relative; see test_hf_export.py for why), HF -> Megatron -> HF gives
bit-identical tensors and the same config fields, and the plugin's pretrain entry trains on from
the imported checkpoint under EP=2.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import _free_port
from hf_helpers import REPO, assert_same_tensors, cli, hf_tensors, megatron_vs_hf, tree_hash

from megatron_moe_ext.cli import main

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
)


def make_hf(kind: str, path, **save_kw):
    """A tiny random HF model of `kind` saved to `path`; norms and biases are random too, so a
    dropped or misplaced one changes the logits."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed({"qwen3": 1, "qwen2": 2, "mixtral": 3}[kind])
    if kind == "qwen3":  # tied input and output embeddings
        m = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **COMMON,
                num_experts=4,
                moe_intermediate_size=48,
                intermediate_size=96,
                norm_topk_prob=True,
                tie_word_embeddings=True,
            )
        )
    elif kind == "qwen2":  # softmax before top-k, q/k/v bias, a gated shared expert, layer 1 dense
        m = Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **COMMON,
                num_experts=4,
                moe_intermediate_size=48,
                intermediate_size=96,
                shared_expert_intermediate_size=80,
                norm_topk_prob=False,
                qkv_bias=True,
                mlp_only_layers=[1],
            )
        )
    else:
        m = MixtralForCausalLM(
            MixtralConfig(
                **COMMON,
                num_local_experts=4,
                intermediate_size=48,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            )
        )
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.1)
    m.save_pretrained(str(path), **save_kw)
    return path


FIELDS = [
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "num_experts_per_tok",
    "num_experts",
    "num_local_experts",
    "intermediate_size",
    "moe_intermediate_size",
    "norm_topk_prob",
    "mlp_only_layers",
    "shared_expert_intermediate_size",
    "qkv_bias",
    "max_position_embeddings",
    "hidden_act",
]


@pytest.mark.dist
@pytest.mark.parametrize(
    "kind,cls",
    [("qwen3", "Qwen3MoeForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM"), ("mixtral", "MixtralForCausalLM")],
)
def test_hf_megatron_hf_round_trip(kind, cls, tmp_path):
    src = make_hf(kind, tmp_path / "src")
    before = tree_hash(src)
    ck = tmp_path / "megatron"
    # import (the verb's library call, EP=2 flags), then Megatron's logits of the checkpoint
    # through Megatron's own loader vs HF's; the verb itself runs in the EP=2 pretrain test
    r = megatron_vs_hf(tmp_path, None, None, src, import_to=ck)
    assert tree_hash(src) == before
    flags = (ck / "megatron_flags.txt").read_text()
    assert "--expert-model-parallel-size 2" in flags and flags.count("\n") == 1
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert r["hf_class"] == cls and r["rel_fro"] < 1e-4, r
    assert r["logit_scale"] > 0.1

    back = tmp_path / "back"
    assert main(["export-hf", "--load", str(ck), "--out", str(back), "--dtype", "fp32"]) == 0
    assert_same_tensors(hf_tensors(src), hf_tensors(back))
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for f in FIELDS:
        assert a.get(f) == b.get(f), (f, a.get(f), b.get(f))


def test_fused_expert_layout_and_bin_import(tmp_path):
    per_expert = make_hf("qwen3", tmp_path / "per_expert")
    fused = make_hf("qwen3", tmp_path / "fused", save_original_format=False)
    names = set(hf_tensors(fused))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # really the fused layout on disk
    assert not any(".experts.0." in n for n in names)

    from megatron_moe_ext.convert.hf.import_hf import prepare_import

    # .bin weights (torch.load(weights_only=True)); fused tensors presented per expert
    binf = tmp_path / "bin"
    binf.mkdir()
    shutil.copy(fused / "config.json", binf / "config.json")
    torch.save(hf_tensors(per_expert), binf / "pytorch_model.bin")
    *_, w_ref = prepare_import(str(per_expert))
    for folder in (fused, binf):
        *_, w = prepare_import(str(folder))
        assert sorted(w.shapes) == sorted(w_ref.shapes)
        for n in w_ref.shapes:
            assert torch.equal(w.get(n), w_ref.get(n)), (folder.name, n)

    # import fills Megatron's tensors from exactly these get() results (test_hf_megatron_hf_round_trip)


@pytest.mark.dist
def test_pretrain_entry_trains_on_from_imported_checkpoint_with_ep2(tmp_path):
    """The plugin's pretrain entry (2 CPU gloo ranks, EP=2) loads the import with --finetune; one
    step at lr 0 and a save leave the weights as imported: export is bit-identical to the source."""
    src = make_hf("mixtral", tmp_path / "src")
    ck = tmp_path / "megatron"
    p = cli("import-hf", "--hf", str(src), "--out", str(ck), "--expert-model-parallel-size", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "MixtralForCausalLM" in p.stdout and "--finetune" in p.stdout
    flags = shlex.split((ck / "megatron_flags.txt").read_text())
    saved = tmp_path / "trained"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "megatron_moe_ext.training.pretrain_gpt",
        "--cpu",
        *flags,
        "--seq-length",
        "64",
        "--mock-data",
        "--tokenizer-type",
        "NullTokenizer",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "1",
        "--lr",
        "0",
        "--min-lr",
        "0",
        "--log-interval",
        "1",
        "--eval-iters",
        "0",
        "--eval-interval",
        "100",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--load",
        str(ck),
        "--finetune",
        "--no-load-optim",
        "--no-load-rng",
        "--save",
        str(saved),
        "--save-interval",
        "1",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "successfully loaded checkpoint from" in proc.stdout
    assert (saved / "iter_0000001").is_dir()
    back = tmp_path / "back"
    assert main(["export-hf", "--load", str(saved), "--out", str(back), "--dtype", "fp32"]) == 0
    assert_same_tensors(hf_tensors(src), hf_tensors(back))


# --- bad input: one sentence, exit 2, nothing written, input unchanged -------------------------


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory):
    return make_hf("mixtral", tmp_path_factory.mktemp("hf") / "src", max_shard_size="150KB")


def _refused(capsys, tmp_path, src, words, *extra):
    out = tmp_path / "out"
    before = tree_hash(src)
    capsys.readouterr()
    assert main(["import-hf", "--hf", str(src), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    # (torch may log a warning of its own on first import; the error is one line of ours)
    ours = [line for line in err.splitlines() if line.startswith("megatron-moe-ext")]
    assert len(ours) == 1 and ours[0].startswith("megatron-moe-ext import-hf: error: "), err
    err = ours[0]
    for w in words:
        assert w in err, err
    assert not out.exists() or (out / "keep.txt").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    assert tree_hash(src) == before


def _copy(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_import_bad_inputs(sharded_src, tmp_path, capsys):
    index = json.loads((sharded_src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3

    bad = _copy(sharded_src, tmp_path, "unknown")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _refused(capsys, tmp_path, bad, ["model_type 'llama'", "not supported"])

    bad = _copy(sharded_src, tmp_path, "missing")
    (bad / shards[1]).unlink()
    _refused(capsys, tmp_path, bad, [shards[1], "missing"])

    bad = _copy(sharded_src, tmp_path, "truncated")
    f = bad / shards[1]
    f.write_bytes(f.read_bytes()[:-1000])
    _refused(capsys, tmp_path, bad, [shards[1], "truncated"])

    bad = _copy(sharded_src, tmp_path, "shape")
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    _refused(capsys, tmp_path, bad, ["has shape", "[48, 64]", "[40, 64]"])

    bad = _copy(sharded_src, tmp_path, "noconfig")
    (bad / "config.json").unlink()
    _refused(capsys, tmp_path, bad, ["no config.json"])

    _refused(
        capsys,
        tmp_path,
        sharded_src,
        ["--expert-model-parallel-size 3", "does not divide 4"],
        "--expert-model-parallel-size",
        "3",
    )

    bad = _copy(sharded_src, tmp_path, "rope")
    (bad / "config.json").write_text(
        json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}})
    )
    _refused(capsys, tmp_path, bad, ["rope_parameters", "yarn"])

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(capsys, tmp_path, sharded_src, ["exists and is not empty", "--overwrite"])
    assert (out / "keep.txt").read_text() == "mine"
