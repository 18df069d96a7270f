"""SwiGLU times the router probability, forward and backward each one Triton kernel pass.

    out[t, f] = silu(gate[t, f]) * up[t, f] * probs[t],   fc1_out[t] = [gate | up]

What Megatron's `weighted_bias_swiglu_impl` computes, for the torch grouped experts. That one is
torch.compile'd, and with a token count that changes every step it recompiles until Dynamo's
limit and then runs eagerly (seen on the H100: "torch._dynamo hit config.recompile_limit (8)
... weighted_swiglu_back"), four to five passes over [tokens, 2F]. Here: forward reads fc1_out
once and writes out; backward reads fc1_out and the gradient once and writes d_fc1 and d_probs.
All arithmetic in float32, results rounded once to the input's dtype.
"""

from __future__ import annotations

import torch

from megatron_moe_ext.kernels.triton_support import tl, triton, use_triton


def weighted_swiglu_reference(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """fc1_out [T, 2F], probs [T] -> [T, F] in fc1_out's dtype (float32 arithmetic)."""
    gate, up = fc1_out.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up * probs.float().unsqueeze(-1)).to(fc1_out.dtype)


def weighted_swiglu(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Differentiable in both inputs; shapes as `weighted_swiglu_reference`. Triton on CUDA,
    the reference (with autograd) elsewhere."""
    if not use_triton(fc1_out):
        return weighted_swiglu_reference(fc1_out, probs)
    return _WeightedSwiGLU.apply(fc1_out, probs)


def _block(f: int) -> int:
    return min(triton.next_power_of_2(max(f, 16)), 2048)


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_out, probs):
        fc1_out, probs = fc1_out.contiguous(), probs.contiguous()
        t, f2 = fc1_out.shape
        f = f2 // 2
        out = torch.empty(t, f, dtype=fc1_out.dtype, device=fc1_out.device)
        if t:
            _fwd_kernel[(t,)](fc1_out, probs, out, f, BLOCK=_block(f), num_warps=4)
        ctx.save_for_backward(fc1_out, probs)
        return out

    @staticmethod
    def backward(ctx, grad):
        fc1_out, probs = ctx.saved_tensors
        grad = grad.contiguous()
        t, f2 = fc1_out.shape
        f = f2 // 2
        d_fc1 = torch.empty_like(fc1_out)
        d_probs = torch.empty(t, dtype=torch.float32, device=fc1_out.device)
        if t:
            _bwd_kernel[(t,)](fc1_out, probs, grad, d_fc1, d_probs, f, BLOCK=_block(f), num_warps=4)
        return d_fc1, d_probs.to(probs.dtype)


if triton is not None:

    @triton.jit
    def _fwd_kernel(x_ptr, p_ptr, out_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        p = tl.load(p_ptr + row).to(tl.float32)
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            mask = offs < F
            g = tl.load(x_ptr + row * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + row * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
            y = g * tl.sigmoid(g) * u * p
            tl.store(out_ptr + row * F + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(x_ptr, p_ptr, dy_ptr, dx_ptr, dp_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        p = tl.load(p_ptr + row).to(tl.float32)
        dp = tl.zeros([BLOCK], dtype=tl.float32)
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            mask = offs < F
            g = tl.load(x_ptr + row * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + row * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * F + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            dg = dy * p * u * s * (1.0 + g * (1.0 - s))
            du = dy * p * silu
            dp += dy * silu * u
            tl.store(dx_ptr + row * 2 * F + offs, dg.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + row * 2 * F + F + offs, du.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dp_ptr + row, tl.sum(dp, axis=0))
