"""The one-rank dispatch with device-side split sizes (mcore/device_splits.py): installed where it
applies, the same function as Megatron's alltoall dispatcher (to the bit at top-2: the skipped
second permutation is the identity on one rank, and the gather-based permutation adds a token's
rows in Megatron's order), and no host read in a training forward and backward
of the whole MoE layer, where Megatron's dispatcher reads its counts on every forward."""

import pytest
import torch

def _layer(megatron_cpu, layer_cls, experts="torch", topk=2, **over):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.spec_utils import get_submodules

    from megatron_moe_ext.experts import torch_experts

    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=topk, moe_token_dispatcher_type="alltoall",
                                  moe_aux_loss_coeff=1e-2, add_bias_linear=False, **over)
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=8, moe_grouped_gemm=False).mlp)
    if experts == "torch":
        subs = type(subs)(experts=torch_experts, router=subs.router)
    return layer_cls(cfg, subs)


def _step(layer, x):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y, _ = layer(x)
    y.backward(torch.ones_like(y) + x.detach())  # a gradient that differs per row
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_installed_only_where_it_applies(megatron_cpu):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer, DeviceSplitsTokenDispatcher
    from megatron_moe_ext.mcore.dispatch import DedupMoELayer

    assert type(_layer(megatron_cpu, DeviceSplitsMoELayer).token_dispatcher) is DeviceSplitsTokenDispatcher
    assert type(_layer(megatron_cpu, DedupMoELayer).token_dispatcher) is DeviceSplitsTokenDispatcher
    assert type(_layer(megatron_cpu, MoELayer).token_dispatcher) is MoEAlltoAllTokenDispatcher
    # experts that split on the host, and token dropping, keep Megatron's dispatcher
    for layer in (_layer(megatron_cpu, DeviceSplitsMoELayer, experts="sequential"),
                  _layer(megatron_cpu, DeviceSplitsMoELayer, moe_expert_capacity_factor=1.0)):
        assert type(layer.token_dispatcher) is MoEAlltoAllTokenDispatcher


@pytest.mark.parametrize("topk", [2, 4])
def test_same_function_as_megatrons_dispatcher(megatron_cpu, topk):
    """Same weights, same fresh inputs: output, input and parameter gradients. Top-2 to the bit
    (a token's two rows summed in the same order); top-4 within 1e-6 relative (float32: the
    gather-sum adds a token's four rows in another order than Megatron's scatter_add)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    stock = _layer(megatron_cpu, MoELayer, topk=topk)
    ours = _layer(megatron_cpu, DeviceSplitsMoELayer, topk=topk)
    ours.load_state_dict(stock.state_dict())
    same = torch.equal if topk == 2 else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max()))
    for seed in range(3):
        x = torch.randn(16, 2, stock.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        (y0, gx0, gp0), (y1, gx1, gp1) = _step(stock, x), _step(ours, x)
        assert same(y1, y0) and same(gx1, gx0)
        assert gp0.keys() == gp1.keys() and all(same(gp1[k], gp0[k]) for k in gp0)


@pytest.mark.parametrize("kernel", ["megatron", "fused"])
def test_no_host_reads_in_the_layer(megatron_cpu, host_reads, kernel):
    """The whole MoE layer (router, permute, experts, unpermute, aux loss) after its first step;
    Megatron's own layer, the control, reads its counts (the check can fail)."""
    import functools

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer
    from megatron_moe_ext.mcore.router import TopKPolicyRouter

    if kernel == "fused":
        pytest.importorskip("triton")
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    ours = _layer(megatron_cpu, DeviceSplitsMoELayer)
    if kernel == "fused":  # the Triton kernel runs on GPUs only; on CPU the router takes its reference path
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        ours.router = functools.partial(TopKPolicyRouter, ext_cfg=MoEExtConfig(router_kernel="fused"))(
            config=ours.config, pg_collection=get_default_pg_collection())
        ours.router.set_layer_number(1)
    stock = _layer(megatron_cpu, MoELayer)
    x = torch.randn(16, 2, stock.config.hidden_size)
    for layer in (ours, stock):
        layer.train()
        _step(layer, x)  # the first forward may read (once-per-load checks)
    assert host_reads(lambda: _step(ours, x)) == []
    assert host_reads(lambda: _step(stock, x)), "Megatron's dispatcher should read its counts"


def test_the_spec_chooses_the_layer(megatron_cpu):
    """--moe-expert-backend torch builds DeviceSplitsMoELayer; --moe-ep1-host-splits builds it with
    Megatron's dispatcher kept; dedup wins; other backends keep Megatron's MoELayer."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer, DeviceSplitsTokenDispatcher
    from megatron_moe_ext.mcore.dispatch import DedupMoELayer
    from megatron_moe_ext.mcore.specs import moe_layer_class_for

    assert moe_layer_class_for(MoEExtConfig()) is None
    assert moe_layer_class_for(MoEExtConfig(expert_backend="te")) is None
    assert moe_layer_class_for(MoEExtConfig(expert_backend="torch")) is DeviceSplitsMoELayer
    assert moe_layer_class_for(MoEExtConfig(expert_backend="torch", dedup_dispatch=True)) is DedupMoELayer
    for dedup in (False, True):
        cls = moe_layer_class_for(MoEExtConfig(expert_backend="torch", dedup_dispatch=dedup, ep1_host_splits=True))
        assert type(_layer(megatron_cpu, cls).token_dispatcher) is MoEAlltoAllTokenDispatcher
        cls = moe_layer_class_for(MoEExtConfig(expert_backend="torch", dedup_dispatch=dedup))
        assert type(_layer(megatron_cpu, cls).token_dispatcher) is DeviceSplitsTokenDispatcher


def test_megatrons_partial_moe_graph_keeps_megatrons_dispatcher(megatron_cpu):
    """Megatron's per-layer moe_router + moe_preprocess graphs hand the dispatcher's state over
    through Megatron's own attribute list; the device-splits dispatcher keeps other state, so it
    stands aside there (the layer keeps Megatron's dispatcher: the same function, host waits)."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer, device_splits_problem

    layer = _layer(megatron_cpu, DeviceSplitsMoELayer, cuda_graph_impl="local",
                   cuda_graph_modules=["moe_router", "moe_preprocess"])
    assert type(layer.token_dispatcher) is MoEAlltoAllTokenDispatcher
    assert "moe_preprocess" in device_splits_problem(layer)
