"""export-hf: Megatron checkpoints trained by the plugin's pretrain entry (EP=2, 2 CPU gloo ranks)
-> HuggingFace folders that transformers loads without remote code, with the same logits.

Tolerance: float32 logits agree within 1e-4 relative (Frobenius norm over all logits). Both sides
compute the same function, but in different operation orders (Megatron's fused grouped qkv GEMM
vs three GEMMs, its local attention vs SDPA, routing softmax over k vs renormalised over E), so
they differ by float32 round-off (~1e-7 measured); any mapping error (a head or expert in the
wrong place, a norm missing) moves the logits by O(1).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import TINY_MODEL, pretrain_cpu
from hf_helpers import assert_same_tensors, hf_tensors, megatron_vs_hf, tree_hash

from megatron_moe_ext.cli import main
from megatron_moe_ext.training.presets import tiny_moe_flags

# Qwen3-MoE: q/k layernorm; GQA (4 query heads, 2 KV groups) so the grouped qkv split is tested;
# softmax before top-k (norm_topk_prob=False).
QWEN3_EXTRA = [
    "--qk-layernorm",
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--moe-router-pre-softmax",
]
TRAIN_FLAGS = tiny_moe_flags(**TINY_MODEL) + ["--vocab-size", "512"]


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3")
    pretrain_cpu(tmp, tmp / "ckpt", tmp / "log.jsonl", *QWEN3_EXTRA, train_iters=5)
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def sp_data(tmp_path_factory):
    """prepare-data's SentencePiece tokenizer and datasets on a slice of the shipped corpus."""
    import gzip

    from megatron_moe_ext.training.data import SHIPPED_CORPUS, PrepareDataConfig, prepare_data

    tmp = tmp_path_factory.mktemp("data")
    (tmp / "in.txt").write_text(gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8").read()[:150_000])
    return prepare_data(
        tmp / "out",
        [tmp / "in.txt"],
        PrepareDataConfig(vocab_size=400, doc_chars=1500, valid_fraction=0.1, test_fraction=0.1),
        verbose=False,
    )


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory, sp_data):
    """Mixtral-like run on SequentialMLP experts with prepare-data's tokenizer (mock data)."""
    tmp = tmp_path_factory.mktemp("mixtral")
    pretrain_cpu(
        tmp,
        tmp / "ckpt",
        tmp / "log.jsonl",
        "--moe-expert-backend",
        "sequential",
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--tokenizer-model",
        sp_data.tokenizer_model,
        train_iters=5,
    )
    return tmp / "ckpt"


@pytest.mark.dist
def test_qwen3_export_logits_match_and_ep_layout_does_not_matter(qwen3_ckpt, tmp_path, capsys):
    hf = tmp_path / "hf"
    before = tree_hash(qwen3_ckpt)
    assert main(["export-hf", "--load", str(qwen3_ckpt), "--out", str(hf), "--dtype", "fp32"]) == 0
    assert "Qwen3MoeForCausalLM" in capsys.readouterr().out
    assert tree_hash(qwen3_ckpt) == before
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["norm_topk_prob"] is False
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_experts_per_tok"]) == (2, 16, 2)
    assert (hf / "generation_config.json").exists()
    names = set(hf_tensors(hf))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.self_attn.q_norm.weight" in names

    # Megatron (real GPTModel, EP=2 checkpoint resharded to EP=1 by Megatron's loader) vs HF
    resaved = tmp_path / "resaved_ep1"
    r = megatron_vs_hf(tmp_path, TRAIN_FLAGS + QWEN3_EXTRA, qwen3_ckpt / "iter_0000005", hf, resave=resaved)
    assert r["hf_class"] == "Qwen3MoeForCausalLM" and r["shape"] == [2, 24, 512]
    assert r["rel_fro"] < 1e-4, r
    assert r["logit_scale"] > 0.1  # not a degenerate all-zero comparison

    # The same weights saved by Megatron in an EP=1 layout (one file, other chunks) export to
    # bit-identical tensors: the reader depends on global tensors only, not on the layout.
    hf1 = tmp_path / "hf_ep1"
    assert main(["export-hf", "--load", str(resaved), "--out", str(hf1), "--dtype", "fp32"]) == 0
    assert len(list((qwen3_ckpt / "iter_0000005").glob("*.distcp"))) == 2
    assert len(list((resaved / "iter_0000001").glob("*.distcp"))) == 1
    assert_same_tensors(hf_tensors(hf), hf_tensors(hf1))


@pytest.mark.dist
def test_mixtral_export_sharded_bf16_and_logits(mixtral_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    # SequentialMLP experts (local_experts.<e>.*) save as the same stacked global tensors
    from megatron_moe_ext.convert.hf.dist_reader import MegatronCheckpoint

    ck = MegatronCheckpoint(mixtral_ckpt / "iter_0000005")
    assert ck.shape("decoder.layers.mlp.experts.experts.linear_fc1.weight") == (2, 4, 256, 64)
    assert not [k for k in ck.keys() if "local_experts" in k]

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert main(["export-hf", "--load", str(mixtral_ckpt), "--out", str(one), "--dtype", "fp32"]) == 0
    assert (
        main(
            [
                "export-hf",
                "--load",
                str(mixtral_ckpt),
                "--out",
                str(sharded),
                "--dtype",
                "fp32",
                "--max-shard-size",
                "200KB",
            ]
        )
        == 0
    )
    assert (one / "model.safetensors").exists() and not (one / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and all((sharded / f).exists() for f in files)
    assert all((sharded / f).stat().st_size < 200_000 + 80_000 for f in files)  # one tensor may overflow
    assert_same_tensors(hf_tensors(one), hf_tensors(sharded))
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in index["weight_map"]

    r = megatron_vs_hf(
        tmp_path,
        TRAIN_FLAGS + ["--moe-expert-backend", "sequential", "--vocab-size", "400"],
        mixtral_ckpt / "iter_0000005",
        sharded,
    )
    assert r["hf_class"] == "MixtralForCausalLM" and r["rel_fro"] < 1e-4, r

    bf = tmp_path / "bf16"
    assert main(["export-hf", "--load", str(mixtral_ckpt), "--out", str(bf), "--dtype", "bf16"]) == 0
    m = AutoModelForCausalLM.from_pretrained(str(bf))
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(m.model.embed_tokens.weight, hf_tensors(one)["model.embed_tokens.weight"].bfloat16())


# --- refusals: one sentence, exit 2, nothing written, input unchanged ----------------------------


def _refused(capsys, args, out, inputs, words):
    before = tree_hash(inputs)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    # (torch may log a warning of its own on first import; the error is one line of ours)
    ours = [line for line in err.splitlines() if line.startswith("megatron-moe-ext")]
    assert len(ours) == 1 and ours[0].startswith("megatron-moe-ext export-hf: error: "), err
    err = ours[0]
    for w in words:
        assert w in err, err
    assert not out.exists() or not any(out.iterdir()) or (out / "keep.txt").exists()
    assert tree_hash(inputs) == before
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return err


@pytest.mark.dist
@pytest.mark.dist
def test_tokenizer_exported_with_the_same_ids(mixtral_ckpt, sp_data, tmp_path):
    import gzip

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_moe_ext.training.data import SHIPPED_CORPUS

    out = tmp_path / "hf"
    assert main(["export-hf", "--load", str(mixtral_ckpt), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").exists() and (out / "tokenizer.model").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=sp_data.tokenizer_model)
    text = gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8").read()[200_000:260_000]
    for i in range(0, len(text), 3000):
        assert tok.encode(text[i : i + 3000], add_special_tokens=False) == sp.encode(text[i : i + 3000]), i
    assert tok.eos_token_id == sp.eos_id() == 2


@pytest.mark.dist
def test_export_bad_inputs(mixtral_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(
        capsys,
        ["export-hf", "--load", str(mixtral_ckpt), "--out", str(out), "--iteration", "3"],
        out,
        mixtral_ckpt,
        ["--iteration 3", "iter_0000005"],
    )
    _refused(
        capsys,
        ["export-hf", "--load", str(tmp_path / "nope"), "--out", str(out)],
        out,
        mixtral_ckpt,
        ["does not exist"],
    )
    # output folder exists and is not empty: refused, its content kept; --overwrite replaces it
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(
        capsys,
        ["export-hf", "--load", str(mixtral_ckpt), "--out", str(out)],
        out,
        mixtral_ckpt,
        ["exists and is not empty", "--overwrite"],
    )
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export-hf", "--load", str(mixtral_ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()

    # a truncated chunk file
    bad = tmp_path / "truncated"
    shutil.copytree(mixtral_ckpt, bad)
    f = sorted((bad / "iter_0000005").glob("*.distcp"))[1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out2 = tmp_path / "out2"
    _refused(capsys, ["export-hf", "--load", str(bad), "--out", str(out2)], out2, bad, ["truncated"])
    # a missing chunk file
    f.unlink()
    _refused(capsys, ["export-hf", "--load", str(bad), "--out", str(out2)], out2, bad, ["missing"])


def test_export_refuses_checkpoint_without_args(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    it = tmp_path / "ckpt" / "iter_0000001"
    it.mkdir(parents=True)
    dcp.save(
        {"embedding.word_embeddings.weight": torch.zeros(8, 4)},
        storage_writer=FileSystemWriter(str(it)),
        no_dist=True,
    )
    (it / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")
    out = tmp_path / "out"
    _refused(
        capsys,
        ["export-hf", "--load", str(tmp_path / "ckpt"), "--out", str(out)],
        out,
        tmp_path / "ckpt",
        ["no saved Megatron args"],
    )


# --- architecture choice and refusals, on the real saved args ---------------------------------


@pytest.fixture(scope="module")
def saved_args(mixtral_ckpt):
    from megatron_moe_ext.convert.hf.dist_reader import MegatronCheckpoint

    return MegatronCheckpoint(mixtral_ckpt / "iter_0000005").args()


def _with(args, **kw):
    a = copy.copy(args)
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.mark.dist
@pytest.mark.parametrize(
    "change,arch",
    [
        ({}, "mixtral"),
        ({"qk_layernorm": True}, "qwen3_moe"),
        ({"qk_layernorm": True, "moe_router_pre_softmax": True}, "qwen3_moe"),
        ({"qk_layernorm": True, "moe_layer_freq": 2}, "qwen3_moe"),
        ({"moe_shared_expert_intermediate_size": 64, "moe_shared_expert_gate": True}, "qwen2_moe"),
        ({"untie_embeddings_and_output_weights": False}, "mixtral"),
        ({"moe_router_topk_scaling_factor": 1.0}, "mixtral"),
    ],
)
def test_architecture_choice(saved_args, change, arch):
    from megatron_moe_ext.convert.hf.arch import choose_architecture, hf_config_kwargs

    a = _with(saved_args, **change)
    assert choose_architecture(a) == arch
    kw = hf_config_kwargs(a, arch)
    if arch != "mixtral":
        assert kw["norm_topk_prob"] == (not change.get("moe_router_pre_softmax", False))
    if change.get("moe_layer_freq") == 2:  # Megatron: layer i is MoE when i % 2 == 0
        assert kw["mlp_only_layers"] == [1] and kw["decoder_sparse_step"] == 1
    assert kw["tie_word_embeddings"] == (not a.untie_embeddings_and_output_weights)


@pytest.mark.dist
@pytest.mark.parametrize(
    "change,words",
    [
        ({"moe_router_pre_softmax": True}, ["--moe-router-pre-softmax", "renormalises"]),
        ({"moe_router_score_function": "sigmoid"}, ["sigmoid", "softmax"]),
        ({"moe_router_enable_expert_bias": True}, ["--moe-router-enable-expert-bias"]),
        ({"moe_router_topk_scaling_factor": 2.5}, ["--moe-router-topk-scaling-factor"]),
        (
            {"moe_router_policy": "c2r", "moe_shared_expert_intermediate_size": 64, "moe_shared_expert_gate": True},
            ["--moe-router-policy c2r", "shared expert"],
        ),
        ({"moe_shared_expert_intermediate_size": 64}, ["--moe-shared-expert-gate"]),
        ({"moe_layer_freq": 2}, ["--moe-layer-freq", "Mixtral"]),
        ({"moe_router_group_topk": 2, "moe_router_num_groups": 2}, ["--moe-router-group-topk"]),
        ({"moe_scmoe": "pos1", "qk_layernorm": True}, ["--qk-layernorm", "--moe-scmoe"]),
    ],
)
def test_architecture_refusals(saved_args, change, words):
    from megatron_moe_ext.convert.hf.arch import choose_architecture
    from megatron_moe_ext.errors import UserError

    with pytest.raises(UserError) as e:
        choose_architecture(_with(saved_args, **change))
    for w in words:
        assert w in str(e.value)
    assert str(e.value).count(".") >= 1 and "\n" not in str(e.value)


@pytest.mark.dist
def test_plugin_policy_exports_as_topk_only_when_asked(saved_args):
    from megatron_moe_ext.convert.hf.arch import choose_architecture

    assert choose_architecture(_with(saved_args, moe_router_policy="locmoe"), routing="topk") == "mixtral"


@pytest.mark.dist
def test_c2r_checkpoint_exported_as_plain_topk_when_asked(tmp_path, capsys):
    """--routing topk: a C2R run's weights as the stock architecture, computing what Megatron
    computes with the same weights and plain top-k routing (the native export is
    tests/test_hf_plugin_export.py)."""
    ckpt = tmp_path / "ckpt"
    pretrain_cpu(tmp_path, ckpt, tmp_path / "log.jsonl", "--moe-router-policy", "c2r", "--moe-c2r-top-t", "1",
                 train_iters=5)
    out = tmp_path / "hf"
    assert (
        main(["export-hf", "--load", str(ckpt), "--out", str(out), "--routing", "topk", "--dtype", "fp32"])
        == 0
    )
    assert "routing plain top-k" in capsys.readouterr().out
    r = megatron_vs_hf(
        tmp_path, TRAIN_FLAGS, ckpt / "iter_0000005", out
    )  # TRAIN_FLAGS: --moe-router-policy topk
    assert r["hf_class"] == "MixtralForCausalLM" and r["rel_fro"] < 1e-4, r


@pytest.mark.dist
def test_pipeline_parallel_checkpoint_exports(tmp_path):
    """PP=2 (each rank saves its own layer of the stacked tensors): the same reader, same logits."""
    ckpt = tmp_path / "ckpt"
    extra = ["--qk-layernorm", "--group-query-attention", "--num-query-groups", "2",
             "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1"]
    pretrain_cpu(tmp_path, ckpt, tmp_path / "log.jsonl", *extra, train_iters=5)
    out = tmp_path / "hf"
    assert main(["export-hf", "--load", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 0
    r = megatron_vs_hf(tmp_path, TRAIN_FLAGS + extra[:4], ckpt / "iter_0000005", out)
    assert r["hf_class"] == "Qwen3MoeForCausalLM" and r["rel_fro"] < 1e-4, r


@pytest.mark.dist
def test_tensor_parallel_checkpoint_exports(tmp_path):
    """TP=2 with sequence parallelism x EP=2 on 4 ranks (each rank saves its shards of the
    attention and dense tensors): torch_dist holds global tensors, so the same reader gives the
    same logits."""
    ckpt = tmp_path / "ckpt"
    extra = ["--qk-layernorm", "--group-query-attention", "--num-query-groups", "2",
             "--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"]
    pretrain_cpu(tmp_path, ckpt, tmp_path / "log.jsonl", *extra, train_iters=5, nproc=4)
    out = tmp_path / "hf"
    assert main(["export-hf", "--load", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 0
    r = megatron_vs_hf(tmp_path, TRAIN_FLAGS + extra[:4], ckpt / "iter_0000005", out)
    assert r["hf_class"] == "Qwen3MoeForCausalLM" and r["rel_fro"] < 1e-4, r
