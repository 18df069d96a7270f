"""The plugin's routers read nothing back to the host in a training forward and backward, once the
first forward after construction or load has run (its once-per-load checks may): the condition
for capturing the router in a CUDA graph and for a router that never waits for the GPU (issue 16).

Python-level reads are what is checked (Tensor.item, tolist, cpu, numpy, bool/int/float of a
tensor), from the plugin's code and from the Megatron code the routers call; data-dependent ops
(nonzero, boolean indexing) appear nowhere in the routers' forward (offline routing only)."""

import functools

import pytest
import torch

from megatron_moe_ext.config import MoEExtConfig

ROUTERS = [  # id, policy, router class name, plugin options, Megatron config overrides
    ("topk", "topk", "TopKPolicyRouter", {}, {}),
    ("topk-fused", "topk", "TopKPolicyRouter", {"router_kernel": "fused"}, {}),
    ("c2r", "c2r", "C2RRouter", {}, {}),
    ("c2r-warmup", "c2r", "C2RRouter", {"c2r_warmup_steps": 4, "c2r_top_t": 1}, {}),
    ("c2r-fused", "c2r", "C2RRouter", {"router_kernel": "fused"}, {}),
    ("locmoe-bias", "locmoe", "LocMoERouter", {"locmoe_local_bias": 0.5}, {}),
    ("locmoe-bias-fused", "locmoe", "LocMoERouter", {"locmoe_local_bias": 0.5, "router_kernel": "fused"}, {}),
    ("locmoe-capacity", "locmoe", "LocMoERouter", {"locmoe_capacity": "bound"}, {"moe_expert_capacity_factor": 1.25}),
    ("locmoe-plus", "locmoe-plus", "LocMoEPlusRouter", {}, {"moe_expert_capacity_factor": 1.0}),
]


@pytest.mark.parametrize("name,policy,cls,ext,over", ROUTERS, ids=[r[0] for r in ROUTERS])
def test_no_host_reads_after_the_first_forward(megatron_cpu, host_reads, name, policy, cls, ext, over):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection

    import megatron_moe_ext.mcore.router as routers

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2, **over)
    r = functools.partial(getattr(routers, cls), ext_cfg=MoEExtConfig(router_policy=policy, **ext))(
        config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    r.train()
    x = torch.randn(16, 2, cfg.hidden_size)
    probs, _ = r(x)
    probs.sum().backward()
    r.on_iteration_end(1)   # once per optimizer step, outside the forward (may read)

    def step():
        probs, _ = r(x)
        probs.sum().backward()

    reads = host_reads(step)
    assert reads == [], reads


def test_the_guard_sees_a_read(megatron_cpu, monkeypatch):
    """The check can fail: LocMoE's capacity bound reads its first estimate in the first forward."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_ext.mcore.router import LocMoERouter

    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_expert_capacity_factor=1.25)
    r = functools.partial(LocMoERouter, ext_cfg=MoEExtConfig(router_policy="locmoe", locmoe_capacity="bound"))(
        config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    r.train()
    reads = []
    orig = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append(1) or orig(self))
    r(torch.randn(16, 2, cfg.hidden_size))
    monkeypatch.undo()
    assert reads
