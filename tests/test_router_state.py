"""Router state advances once per optimizer step, never inside a forward.

Under activation recomputation Megatron runs a micro-batch's forward twice, first without
gradients and again in the backward; both must choose the same experts at the same capacity, and
evaluation forwards must change no state. Routing replay records and replays the policy's own
choice. Real Megatron routers and Megatron's own `tensor_parallel.checkpoint`.
"""

import pytest
import torch

from megatron_moe_ext.config import MoEExtConfig

CASES = {
    # capacity from an EMA of the angle statistic (updated twice per micro-batch before the fix)
    "locmoe-capacity": (dict(router_policy="locmoe", locmoe_capacity="bound"),
                        dict(moe_expert_capacity_factor=1.25)),
    # local bias switched on after a warm-up iteration
    "locmoe-bias": (dict(router_policy="locmoe", locmoe_local_bias=0.5, locmoe_local_bias_warmup_steps=1), {}),
    # capacity re-estimated every iteration
    "locmoe-plus": (dict(router_policy="locmoe-plus", locmoe_plus_reestimate_interval=1),
                    dict(moe_expert_capacity_factor=1.0)),
    # partners frozen after a warm-up iteration
    "c2r-warmup": (dict(router_policy="c2r", c2r_top_t=1, c2r_warmup_steps=1), {}),
}


def _router(common, policy_kw, cfg_kw):
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_moe_ext.mcore.specs import router_class_for

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = common.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2, **cfg_kw)
    ext = MoEExtConfig(**policy_kw)
    r = router_class_for(ext)(config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    if ext.router_policy == "locmoe":  # EP=1 puts every expert on the node: fake a second node
        r.locality_mask.copy_(torch.tensor([True] * 4 + [False] * 4))
    return r


def _checkpointed_step(router, x):
    """One micro-batch through Megatron's activation checkpointing; the routing maps of its
    forward (no grad) and of its recompute (in the backward)."""
    from megatron.core import tensor_parallel

    maps = []
    handle = router.register_forward_hook(lambda m, i, out: maps.append(out[1].clone()))
    try:
        xi = x.clone().requires_grad_(True)
        probs, _ = tensor_parallel.checkpoint(lambda t: router(t), False, xi)
        (probs * torch.linspace(-1, 1, probs.shape[1])).sum().backward()
    finally:
        handle.remove()
    return maps


def _state(router):
    return {k: v.clone() for k, v in router.state_dict().items()} | {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(router).items()
        if k in ("_coact", "_capacity", "resonance_capacity", "_delta_sum")}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_recompute_choose_the_same_experts(megatron_cpu, case):
    torch.manual_seed(0)
    r = _router(megatron_cpu, *CASES[case])
    r.train()
    for iteration in (1, 2, 3):
        for _ in range(2):  # micro-batches
            first, recomputed = _checkpointed_step(r, torch.randn(64, 1, 16))
            assert torch.equal(first, recomputed), f"iteration {iteration}"
        r.on_iteration_end(iteration)
    # the state did move (else the test shows nothing)
    moved = {"locmoe-capacity": lambda: r._capacity is not None,
             "locmoe-bias": lambda: int(r.locmoe_bias_on) == 1,
             "locmoe-plus": lambda: r.resonance_capacity is not None,
             "c2r-warmup": lambda: int(r.c2r_active) == 1}
    assert moved[case]()


@pytest.mark.parametrize("case", list(CASES))
def test_evaluation_changes_no_state(megatron_cpu, case):
    torch.manual_seed(1)
    r = _router(megatron_cpu, *CASES[case])
    r.train()
    r(torch.randn(64, 1, 16))
    before = _state(r)
    r.eval()
    with torch.no_grad():
        for _ in range(3):
            r(torch.randn(64, 1, 16))
    _same(before, _state(r))


def test_routing_replay_records_and_replays_the_policys_choice(megatron_cpu):
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    torch.manual_seed(2)
    policy = dict(router_policy="c2r", c2r_top_t=1)
    r = _router(megatron_cpu, policy, dict(moe_enable_routing_replay=True))
    r.train()
    x = torch.randn(32, 1, 16)
    try:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        _, recorded_map = r(x)
        recorded = r.router_replay.get_recorded_indices()
        assert recorded is not None
        assert torch.equal(torch.zeros_like(recorded_map).scatter_(1, recorded, True), recorded_map)
        # C2R's constraint holds in what was recorded: both experts share a partner list
        assert all(int(recorded[t, 1]) in r.c2r_partners[recorded[t, 0]].tolist() for t in range(32))
        # replaying other indices routes to exactly those
        target = torch.stack([torch.arange(32) % 8, (torch.arange(32) + 3) % 8], dim=1)
        r.router_replay.set_target_indices(target)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        _, replayed_map = r(x)
        assert torch.equal(replayed_map, torch.zeros_like(replayed_map).scatter_(1, target, True))
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_router_replay_instances()


def test_locmoe_plus_refuses_routing_replay(megatron_cpu):
    with pytest.raises(ValueError, match="--moe-enable-routing-replay"):
        _router(megatron_cpu, dict(router_policy="locmoe-plus"),
                dict(moe_expert_capacity_factor=1.0, moe_enable_routing_replay=True))


def test_fp8_weight_cache_advances_with_the_iteration_hook(megatron_cpu):
    """The FP8 experts re-quantize after `end_iteration` (the once-per-step hook), not on a
    forward; no global optimizer hook is involved."""
    from test_fp8_experts import _experts

    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP
    from megatron_moe_ext.mcore.iteration import end_iteration

    mod = _experts(megatron_cpu, True, cls=TorchFP8GroupedMLP, emulate=True)
    w = mod.linear_fc1.weight
    first = mod.quantized_weight(w)
    assert all(a is b for a, b in zip(first, mod.quantized_weight(w)))
    end_iteration([mod], 1)
    assert mod.quantized_weight(w)[0] is not first[0]
