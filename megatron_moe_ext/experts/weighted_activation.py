"""The expert activation times the router probability, forward and backward each one Triton
kernel pass:

    SwiGLU: out[t, f] = silu(gate[t, f]) * up[t, f] * probs[t],   fc1_out[t] = [gate | up]
    GELU:   out[t, f] = gelu(fc1_out[t, f]) * probs[t]            (erf GELU, torch's default)

SwiGLU is what Megatron's `weighted_bias_swiglu_impl` computes, for the torch grouped experts.
That one is torch.compile'd, and with a token count that changes every step it recompiles until
Dynamo's limit and then runs eagerly (seen on the H100: "torch._dynamo hit config.recompile_limit
(8) ... weighted_swiglu_back"), four to five passes over [tokens, 2F]. For GELU Megatron's MLP
applies the activation and then scales by the probability in float32 (mlp.py per_token_scale):
on the H200's 16-expert GELU layer those float32 multiplies, casts and their backward took about
0.4 ms of a 1.95 ms captured layer (docs/performance.md section 3). Here: forward reads fc1_out
once and writes out; backward reads fc1_out and the gradient once and writes d_fc1 and d_probs.
All arithmetic in float32, results rounded once to the input's dtype (Megatron rounds GELU's
output to BF16 before the scaling: the two differ by at most one BF16 rounding).
"""

from __future__ import annotations

import torch

from megatron_moe_ext.kernels.triton_support import tl, triton, use_triton


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)   # float32, or float64 for float64 input


def weighted_swiglu_reference(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """fc1_out [T, 2F], probs [T] -> [T, F] in fc1_out's dtype (float32 arithmetic; float64 for
    float64 input, which makes it the tests' float64 reference too)."""
    gate, up = fc1_out.to(_math_dtype(fc1_out)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up * probs.to(gate.dtype).unsqueeze(-1)).to(fc1_out.dtype)


def weighted_gelu_reference(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """fc1_out [T, F], probs [T] -> [T, F] in fc1_out's dtype (arithmetic as the SwiGLU's)."""
    a = fc1_out.to(_math_dtype(fc1_out))
    return (torch.nn.functional.gelu(a) * probs.to(a.dtype).unsqueeze(-1)).to(fc1_out.dtype)


def weighted_swiglu(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Differentiable in both inputs; shapes as `weighted_swiglu_reference`. Triton on CUDA,
    the reference (with autograd) elsewhere."""
    if not use_triton(fc1_out):
        return weighted_swiglu_reference(fc1_out, probs)
    return _WeightedAct.apply(fc1_out, probs, True)


def weighted_gelu(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Differentiable in both inputs; shapes as `weighted_gelu_reference`. Triton on CUDA,
    the reference (with autograd) elsewhere."""
    if not use_triton(fc1_out):
        return weighted_gelu_reference(fc1_out, probs)
    return _WeightedAct.apply(fc1_out, probs, False)


def _block(f: int) -> int:
    return min(triton.next_power_of_2(max(f, 16)), 2048)


class _WeightedAct(torch.autograd.Function):
    """glu=True: SwiGLU of fc1_out [T, 2F]; False: GELU of fc1_out [T, F]."""

    @staticmethod
    def forward(ctx, fc1_out, probs, glu: bool):
        fc1_out, probs = fc1_out.contiguous(), probs.contiguous()
        t = fc1_out.shape[0]
        f = fc1_out.shape[1] // 2 if glu else fc1_out.shape[1]
        out = torch.empty(t, f, dtype=fc1_out.dtype, device=fc1_out.device)
        if t:
            _weighted_act_fwd_kernel[(t,)](fc1_out, probs, out, f, BLOCK=_block(f), GLU=glu, num_warps=4)
        ctx.save_for_backward(fc1_out, probs)
        ctx.glu = glu
        return out

    @staticmethod
    def backward(ctx, grad):
        fc1_out, probs = ctx.saved_tensors
        grad = grad.contiguous()
        t, f = grad.shape
        d_fc1 = torch.empty_like(fc1_out)
        d_probs = torch.empty(t, dtype=torch.float32, device=fc1_out.device)
        if t:
            _weighted_act_bwd_kernel[(t,)](fc1_out, probs, grad, d_fc1, d_probs, f, BLOCK=_block(f), GLU=ctx.glu,
                                           num_warps=4)
        return d_fc1, d_probs.to(probs.dtype), None


if triton is not None:
    # constexpr: a compiled kernel may read only constexpr globals (the interpreter reads any)
    _RSQRT2 = tl.constexpr(0.7071067811865476)      # 1 / sqrt(2)
    _RSQRT2PI = tl.constexpr(0.3989422804014327)    # 1 / sqrt(2 pi)

    @triton.jit
    def _weighted_act_fwd_kernel(x_ptr, p_ptr, out_ptr, F, BLOCK: tl.constexpr, GLU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        p = tl.load(p_ptr + row).to(tl.float32)
        width = 2 * F if GLU else F   # fc1_out's row length
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            mask = offs < F
            a = tl.load(x_ptr + row * width + offs, mask=mask, other=0.0).to(tl.float32)
            if GLU:
                u = tl.load(x_ptr + row * width + F + offs, mask=mask, other=0.0).to(tl.float32)
                y = a * tl.sigmoid(a) * u * p
            else:
                y = 0.5 * a * (1.0 + tl.erf(a * _RSQRT2)) * p
            tl.store(out_ptr + row * F + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _weighted_act_bwd_kernel(x_ptr, p_ptr, dy_ptr, dx_ptr, dp_ptr, F, BLOCK: tl.constexpr,
                                 GLU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        p = tl.load(p_ptr + row).to(tl.float32)
        width = 2 * F if GLU else F
        dp = tl.zeros([BLOCK], dtype=tl.float32)
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            mask = offs < F
            a = tl.load(x_ptr + row * width + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * F + offs, mask=mask, other=0.0).to(tl.float32)
            if GLU:
                u = tl.load(x_ptr + row * width + F + offs, mask=mask, other=0.0).to(tl.float32)
                s = tl.sigmoid(a)
                silu = a * s
                da = dy * p * u * s * (1.0 + a * (1.0 - s))
                dp += dy * silu * u
                tl.store(dx_ptr + row * width + F + offs, (dy * p * silu).to(dx_ptr.dtype.element_ty), mask=mask)
            else:
                cdf = 0.5 * (1.0 + tl.erf(a * _RSQRT2))
                da = dy * p * (cdf + a * tl.exp(-0.5 * a * a) * _RSQRT2PI)
                dp += dy * a * cdf
            tl.store(dx_ptr + row * width + offs, da.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dp_ptr + row, tl.sum(dp, axis=0))
