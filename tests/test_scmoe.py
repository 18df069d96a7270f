"""ScMoE / DGMoE layers on real Megatron classes (CPU, gloo): the paper's equations, EP=2 == EP=1,
DGMoE's collision rule, and the errors for configurations that would split a shortcut."""

import argparse

import pytest
import torch

from megatron_moe_ext.config import MoEExtConfigError

# Outputs and gradients are float32 computations of the same math in a different order (per-token
# loops in the reference, permuted batches in Megatron): differences are a few float32 ulps of
# values of order 1, far below any wiring error (which shows up at order 1).
TOL = 2e-5


def test_shortcut_sources_follow_the_layer_pattern(megatron_cpu):
    from megatron_moe_ext.mcore.scmoe_spec import moe_layer_pattern, scmoe_shortcut_sources

    assert moe_layer_pattern(2, 4) == [1, 0, 1, 0]
    assert scmoe_shortcut_sources([0, 1, 0, 1], "pos2") == {1: 0, 3: 2}
    assert scmoe_shortcut_sources([1, 0, 1, 0], "pos2") == {0: None, 2: 1}  # L0 reads its input
    assert scmoe_shortcut_sources([1, 1, 1], "pos1") == {0: None, 1: None, 2: None}
    assert scmoe_shortcut_sources([0, 1, 1], "dgmoe") == {1: 0, 2: None}
    with pytest.raises(ValueError, match="use --moe-scmoe pos1"):
        scmoe_shortcut_sources([0, 1, 1], "pos2")


VARIANTS = [("pos2", [0, 1, 0, 1]), ("pos2", [1, 0, 1, 0]), ("pos1", [1, 1, 1]), ("dgmoe", [0, 1, 0, 1])]


@pytest.mark.parametrize("mode,pattern", VARIANTS, ids=[f"{m}-{''.join(map(str, p))}" for m, p in VARIANTS])
@pytest.mark.parametrize("slot", ["auto", "1", "3", "4"])
def test_block_matches_the_papers_equations(megatron_cpu, mode, pattern, slot):
    from scmoe_common import (
        causal_mask,
        reference_forward,
        scmoe_block,
        scmoe_config,
        set_global_weights,
    )

    torch.manual_seed(0)
    block = scmoe_block(mode, scmoe_config(mode, pattern), expert_slot=slot)
    set_global_weights(block, seed=1)
    x = torch.randn(5, 2, 16)
    dy = torch.randn(5, 2, 16)
    mask = causal_mask(5)

    def grads(fn):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * dy).sum().backward()
        return y.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()
                                     if p.grad is not None}

    y, dx, dp = grads(lambda xi: block(hidden_states=xi, attention_mask=mask))
    y_ref, dx_ref, dp_ref = grads(lambda xi: reference_forward(block, xi, mask, mode))
    assert (y - y_ref).abs().max() < TOL
    assert (dx - dx_ref).abs().max() < TOL
    assert dp_ref.keys() <= dp.keys()
    assert any("shortcut_layernorm" in n for n in dp_ref)  # the routed path's own norm is trained
    for name in dp:  # an expert no token chose: zero gradient in Megatron, none in the reference
        ref = dp_ref.get(name, torch.zeros_like(dp[name]))
        assert (dp[name] - ref).abs().max() < TOL, name


def test_dgmoe_current_pass_never_repeats_the_previous_choice(megatron_cpu):
    from scmoe_common import (
        causal_mask,
        reference_forward,
        scmoe_block,
        scmoe_config,
        set_global_weights,
    )

    block = scmoe_block("dgmoe", scmoe_config("dgmoe", [0, 1]))
    set_global_weights(block, seed=2)
    maps = []
    block.layers[1].mlp.router.register_forward_hook(lambda m, i, out: maps.append(out[1].clone()))
    x = torch.randn(6, 2, 16)
    stats = {}
    with torch.no_grad():
        block(hidden_states=x, attention_mask=causal_mask(6))
        reference_forward(block, x, causal_mask(6), "dgmoe", stats)
    prev, cur = maps  # the shortcut pass routes first, the current pass second
    assert prev.sum(1).eq(1).all() and cur.sum(1).eq(1).all()
    assert not (prev & cur).any()
    # The rule was exercised: unconstrained, the same gate would repeat for these tokens.
    assert stats["collisions"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("mode,policy,topk,dedup", [("pos2", "topk", 1, ""), ("pos1", "topk", 1, ""),
                                                    ("dgmoe", "topk", 1, ""), ("pos2", "topk", 2, "dedup"),
                                                    ("dgmoe", "locmoe", 1, "")])
def test_ep2_equals_ep1(torchrun_json, mode, policy, topk, dedup):
    r = torchrun_json("scmoe_ep_equivalence.py", 2, mode, policy, str(topk), dedup)
    assert r["params_compared"] > 40
    assert r["output"] < TOL and r["input_grad"] < TOL and r["param_grad"] < TOL, r


# --- configurations that would break a shortcut ----------------------------------------------

def test_stage_boundary_between_a_pair_is_refused(megatron_cpu):
    from scmoe_common import scmoe_block, scmoe_config

    cfg = scmoe_config("pos2", [0, 1, 0, 1])
    cfg.num_layers = 4
    with pytest.raises(ValueError, match="pipeline stage boundary"):
        # a stage that starts at global layer 1 (an MoE layer reading layer 0)
        scmoe_block("pos2", cfg, layer_offset=1)


@pytest.mark.parametrize("method,n,match", [("block", 2, "--recompute-method uniform"),
                                            ("uniform", 1, "splits an ScMoE pair"),
                                            ("uniform", 3, "splits an ScMoE pair")])
def test_recompute_that_splits_a_pair_is_refused(megatron_cpu, method, n, match):
    from scmoe_common import scmoe_block, scmoe_config

    cfg = scmoe_config("pos2", [0, 1, 0, 1], recompute_granularity="full", recompute_method=method,
                       recompute_num_layers=n)
    with pytest.raises(ValueError, match=match):
        scmoe_block("pos2", cfg)


def _args(**kw):
    base = dict(num_experts=4, moe_router_topk=1, expert_model_parallel_size=1, world_size=1,
                moe_scmoe="pos2", num_layers=4, moe_layer_freq=[0, 1, 0, 1],
                moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
                moe_router_pre_softmax=True)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("overrides,flag", [
    (dict(overlap_moe_expert_parallel_comm=True), "--overlap-moe-expert-parallel-comm"),
    (dict(moe_shared_expert_intermediate_size=None), "--moe-shared-expert-intermediate-size"),
    (dict(moe_shared_expert_gate=False), "--moe-shared-expert-gate"),
    (dict(moe_router_pre_softmax=False), "--moe-router-pre-softmax"),
    (dict(moe_layer_freq=1), "--moe-scmoe pos1"),
    (dict(moe_shared_expert_overlap=True), "--moe-shared-expert-overlap"),
    (dict(moe_scmoe="dgmoe"), "--moe-shared-expert-intermediate-size"),
    (dict(moe_scmoe="dgmoe", moe_shared_expert_intermediate_size=None, moe_router_policy="c2r"),
     "--moe-router-policy c2r"),
    (dict(recompute_granularity="full", recompute_method="block"), "--recompute-method uniform"),
    (dict(moe_scmoe="off", moe_scmoe_expert_slot="2"), "--moe-scmoe-expert-slot"),
])
def test_bad_combinations_fail_at_parse_time(overrides, flag):
    from megatron_moe_ext.args import moe_ext_config_from_args

    with pytest.raises(MoEExtConfigError) as e:
        moe_ext_config_from_args(_args(**overrides), exit_on_error=False)
    msg = str(e.value)
    assert flag in msg and msg.endswith(".") and ". " not in msg, msg


def test_valid_combination_parses():
    from megatron_moe_ext.args import moe_ext_config_from_args

    cfg = moe_ext_config_from_args(_args(moe_scmoe_expert_slot="3"), exit_on_error=False)
    assert cfg.scmoe == "pos2" and cfg.scmoe_expert_slot == "3"


# --- the plugin's pretrain entry (Megatron's pretrain(), 2 gloo ranks, EP=2) --------------------

SCMOE_FLAGS = ("--moe-scmoe", "pos2", "--moe-layer-freq", "[0,1]",
               "--moe-shared-expert-intermediate-size", "128", "--moe-shared-expert-gate",
               "--moe-router-pre-softmax")


@pytest.mark.dist
def test_pretrain_pos2_recompute_gives_the_same_losses(tmp_path):
    """Full uniform recomputation (2 layers per chunk: one pair) re-runs the shortcut inside the
    chunk; with dropout off the losses equal the run that keeps activations."""
    from conftest import pretrain_cpu, train_losses

    runs = {}
    for name, extra in (("keep", ()), ("recompute", ("--recompute-granularity", "full",
                                                     "--recompute-method", "uniform",
                                                     "--recompute-num-layers", "2"))):
        log = tmp_path / f"{name}.jsonl"
        pretrain_cpu(tmp_path, tmp_path / f"ckpt_{name}", log, *SCMOE_FLAGS, "--moe-router-topk", "1",
                     *extra, train_iters=4)
        runs[name] = train_losses(log)
    assert sorted(runs["keep"]) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in runs["keep"].values())
    for it, loss in runs["keep"].items():
        assert runs["recompute"][it] == pytest.approx(loss, rel=1e-6), (it, runs)
