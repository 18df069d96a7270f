"""export-hf for the plugin's routing policies and ScMoE layers: the exported folder (with the
shipped modeling_moe_ext.py, loaded with trust_remote_code) computes what the Megatron model
computes. Checkpoints are trained by the plugin's pretrain entry (EP=2, 2 CPU gloo ranks); the
Megatron side is the real GPTModel with the plugin's layers (tests/dist/hf_megatron_check.py).

Tolerance as in test_hf_export.py: float32 logits within 1e-4 relative (Frobenius); the two sides
differ by float32 round-off (~1e-7), while a wrong partner list, expert or shortcut moves the
logits by O(1). LocMoE+ runs with a capacity factor that drops nothing (inference is dropless).
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_MODEL, pretrain_cpu
from hf_helpers import megatron_vs_hf

from megatron_moe_ext.cli import main
from megatron_moe_ext.training.presets import tiny_moe_flags

pytest.importorskip("transformers")
pytestmark = pytest.mark.dist

SHARED = ["--moe-shared-expert-intermediate-size", "128", "--moe-shared-expert-gate"]
CASES = {
    # learned partners (warm-up over after 2 of 5 iterations), one co-resident partner
    "c2r-warmup": (["--moe-router-policy", "c2r", "--moe-c2r-warmup-steps", "2", "--moe-c2r-top-t", "1"],
                   "MoeExtMixtralForCausalLM"),
    "locmoe-plus": (["--moe-router-policy", "locmoe-plus", "--moe-expert-capacity-factor", "4.0",
                     "--moe-locmoe-plus-tau", "0.6"], "MoeExtMixtralForCausalLM"),
    # LocMoE's selection at inference is top-k over its gate: the stock architecture
    "locmoe": (["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias", "0.5", "--moe-ranks-per-node", "1"],
               "MixtralForCausalLM"),
    "scmoe-pos2": (["--moe-scmoe", "pos2", "--moe-layer-freq", "[0,1]", *SHARED], "MoeExtScMoEForCausalLM"),
    "scmoe-pos1": (["--moe-scmoe", "pos1", *SHARED], "MoeExtScMoEForCausalLM"),
    "dgmoe": (["--moe-scmoe", "dgmoe"], "MoeExtScMoEForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plugin_model_exports_with_megatrons_logits(tmp_path, capsys, case):
    extra, hf_class = CASES[case]
    ckpt = tmp_path / "ckpt"
    pretrain_cpu(tmp_path, ckpt, tmp_path / "log.jsonl", *extra, train_iters=5)
    out = tmp_path / "hf"
    assert main(["export-hf", "--load", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 0
    assert hf_class in capsys.readouterr().out
    if hf_class.startswith("MoeExt"):
        assert (out / "modeling_moe_ext.py").exists()
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == f"modeling_moe_ext.{hf_class}"
    flags = tiny_moe_flags(**TINY_MODEL) + ["--vocab-size", "512", *extra]
    r = megatron_vs_hf(tmp_path, flags, ckpt / "iter_0000005", out)
    assert r["hf_class"] == hf_class and r["rel_fro"] < 1e-4, r


def test_scmoe_refuses_plain_topk_export(tmp_path, capsys):
    from megatron_moe_ext.convert.hf.plugin_arch import plugin_variant
    from megatron_moe_ext.errors import UserError

    class Args:
        moe_router_policy, moe_scmoe = "topk", "pos2"

    with pytest.raises(UserError, match="--routing native"):
        plugin_variant(Args(), "topk")
    assert plugin_variant(Args(), "native") == "scmoe"
