"""The router's tensor-core gating GEMM (kernels/router_gemm.py) against a float64 reference and
against Megatron's RouterGatingLinearFunction with router dtype FP32, on fresh random BF16 inputs
and an FP32 upstream gradient; and inside the plugin's router (--moe-router-kernel fused).

Tolerances: the logits are FP32 sums of exact products, 1e-6 relative to their largest value
(another summation order over H terms); the gradients are rounded to BF16 at the end, as
Megatron's are, so they may differ from Megatron's by one BF16 rounding step (2^-8 relative) where
the FP32 values lie near a rounding boundary, and otherwise agree exactly."""

from __future__ import annotations

import torch

from megatron_moe_ext.kernels.router_gemm import gating_logits, gating_wgrad, split_bf16, tensor_core_gating_applies


def _case(t=96, h=64, e=16, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 2, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, h, generator=g) / h ** 0.5).to(torch.bfloat16)
    b = torch.randn(e, generator=g).to(torch.bfloat16) if bias else None
    up = torch.randn(t, 2, e, generator=g) * torch.logspace(-6, 0, e)  # gradients across scales
    return x, w, b, up


def _grads(fn, x, w, b, up):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    out = fn(x, w, b)
    out.backward(up)
    return out.detach(), x.grad, w.grad, None if b is None else b.grad


def _assert_within_one_bf16_step(a: torch.Tensor, ref: torch.Tensor, scale=None) -> None:
    """a within one BF16 step of ref; scale (the sum of the terms' magnitudes) adds the FP32 sums'
    own error where terms cancel."""
    assert a.dtype == ref.dtype == torch.bfloat16
    tol = 2.0 ** -7 * ref.float().abs() + (0 if scale is None else 2.0 ** -14 * scale.float())
    assert ((a.float() - ref.float()).abs() <= tol).all()


def test_split_keeps_sixteen_bits():
    g = torch.randn(4096, dtype=torch.float32) * torch.logspace(-20, 5, 4096)
    hi, lo = split_bf16(g)
    err = (hi.double() + lo.double() - g.double()).abs()
    assert (err <= 2.0 ** -16 * g.double().abs()).all()
    # hi alone is BF16's rounding, 256 times worse: the split is what makes wgrad FP32-grade
    assert (hi.double() - g.double()).abs().max() > 16 * err.max()


def test_against_float64():
    x, w, _, up = _case(seed=1)
    out, gx, gw, _ = _grads(lambda a, b, c: gating_logits(a, b, c), x, w, None, up)
    xd, wd, upd = x.double().reshape(-1, x.shape[-1]), w.double(), up.double().reshape(-1, w.shape[0])
    ref = (xd @ wd.t()).view(out.shape)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    # wgrad before its final rounding: the split's 2^-16 relative error, summed over T terms
    gw32 = gating_wgrad(up.reshape(-1, w.shape[0]), x.reshape(-1, x.shape[-1]))
    gw_ref = upd.t() @ xd
    assert ((gw32.double() - gw_ref).abs() <= 2.0 ** -14 * (upd.abs().t() @ xd.abs())).all()
    _assert_within_one_bf16_step(gw, gw_ref.to(torch.bfloat16), upd.abs().t() @ xd.abs())
    _assert_within_one_bf16_step(gx, (upd @ wd).view(x.shape).to(torch.bfloat16),
                                 (upd.abs() @ wd.abs()).view(x.shape))


def test_against_megatrons_fp32_gating():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    for seed, bias in ((2, False), (3, True)):
        x, w, b, up = _case(seed=seed, bias=bias)
        ours = _grads(lambda a, c, d: gating_logits(a, c, d), x, w, b, up)
        theirs = _grads(lambda a, c, d: router_gating_linear(a, c, d, torch.float32), x, w, b, up)
        assert ours[0].dtype == theirs[0].dtype == torch.float32
        assert (ours[0] - theirs[0]).abs().max() <= 1e-6 * theirs[0].abs().max()
        u, xf, wf = up.abs().reshape(-1, w.shape[0]), x.float().abs().reshape(-1, x.shape[-1]), w.float().abs()
        scales = ((u @ wf).view(x.shape), u.t() @ xf, u.sum(0))
        for a, ref, scale in zip(ours[1:], theirs[1:], scales):
            if ref is not None:
                _assert_within_one_bf16_step(a, ref, scale)


def test_applies_only_to_fp32_logits_from_bf16():
    x, w = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16)
    assert tensor_core_gating_applies(x, w, "fp32")
    assert not tensor_core_gating_applies(x, w, None)          # BF16 logits: Megatron's own GEMM
    assert not tensor_core_gating_applies(x, w, "fp64")
    assert not tensor_core_gating_applies(x.half(), w.half(), "fp32")
    assert not tensor_core_gating_applies(x.float(), w.float(), "fp32")


def test_fused_router_takes_it_and_megatrons_does_not(megatron_cpu):
    """In Megatron's router with BF16 weights and --moe-router-dtype fp32: the fused plugin router
    computes its logits with gating_logits, the same as Megatron's TopKRouter's to 1e-6."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.kernels import router_gemm
    from megatron_moe_ext.mcore.router import TopKPolicyRouter

    torch.manual_seed(0)
    cfg = megatron_cpu.moe_config(num_moe_experts=16, moe_router_topk=2, moe_router_dtype="fp32",
                                  bf16=True, params_dtype=torch.bfloat16)
    pg = get_default_pg_collection()
    fused = TopKPolicyRouter(config=cfg, pg_collection=pg, ext_cfg=MoEExtConfig(router_kernel="fused"))
    stock = TopKRouter(config=cfg, pg_collection=pg)
    stock.load_state_dict(fused.state_dict(), strict=False)
    assert fused.weight.dtype == torch.bfloat16
    x = torch.randn(8, 2, cfg.hidden_size).to(torch.bfloat16)
    calls = []
    original = router_gemm._GatingGEMM.forward

    def counting(ctx, *a):
        calls.append(1)
        return original(ctx, *a)

    router_gemm._GatingGEMM.forward = staticmethod(counting)
    try:
        ours, theirs = fused.gating(x), stock.gating(x)
    finally:
        router_gemm._GatingGEMM.forward = staticmethod(original)
    assert calls == [1]
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()
