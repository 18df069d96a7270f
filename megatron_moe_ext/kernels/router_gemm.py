"""The router's gating GEMM on tensor cores: FP32 logits from BF16 hidden states and a BF16 router
weight, the function `--moe-router-dtype fp32` asks for, without FP32 GEMMs.

Megatron's RouterGatingLinearFunction (moe_utils.py:1294) casts both operands to FP32 and, without
Transformer Engine, runs three FP32 GEMMs (forward, dgrad, wgrad) on FFMA units: 0.14-0.31 ms of a
0.4-0.6 ms captured router on an H200 (docs/performance.md section 3). Here:

- forward: `torch.mm(x, w.t(), out_dtype=float32)`. Every BF16 value is exact in FP32 and so is
  every product of two, so this is the FP32 GEMM of the cast operands, with the same FP32
  accumulation (another summation order);
- backward: the upstream gradient g [T, E] is FP32 and not exact in BF16, so it is split as
  g = hi + lo (both BF16; hi + lo keeps about 16 of FP32's 24 mantissa bits, error <= 2^-17 |g|)
  and each gradient is one BF16 GEMM with the split stacked along the shared dimension:
  dgrad  [hi | lo] [T, 2E] @ [w; w] [2E, H] -> BF16 (the input's dtype, as Megatron returns it);
  wgrad  [hi; lo]^T [2E, T] @ x [T, H] -> FP32, the two halves summed, then the weight's dtype.
  Both results are rounded to BF16 at the end, as Megatron's are (2^-8 relative): far coarser
  than the split's 2^-17. (The dgrad GEMM's K is 2E, too short for cuBLAS to split it.)

Off CUDA (or on a torch without `mm(..., out_dtype=)`), the BF16 GEMMs with FP32 output run as
FP32 GEMMs of the cast operands: the same numbers, which is how the CPU tests check the split.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_on_cuda() -> bool:
    """Whether this torch has the BF16 x BF16 -> FP32 `mm(..., out_dtype=)` on this GPU (torch >= 2.8,
    BF16 tensor cores: compute capability >= 8.0). Decided from the operator's schema and the
    device, without launching anything: the first call may come inside a CUDA-graph capture."""
    return (torch.cuda.is_available() and hasattr(torch.ops.aten.mm, "dtype")
            and torch.cuda.get_device_capability() >= (8, 0))


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N], BF16 operands, FP32 accumulation and FP32 result [M, N]."""
    if a.is_cuda and _mm_out_dtype_on_cuda():
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def split_bf16(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """g (FP32) -> (hi, lo), both BF16 with hi + lo = g to about 2^-17 |g| (lo rounds hi's
    rounding error, itself at most 2^-8 |g|)."""
    hi = g.to(torch.bfloat16)
    return hi, (g - hi.float()).to(torch.bfloat16)


def gating_dgrad(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g [T, E] FP32, weight [E, H] BF16 -> dL/dx [T, H] BF16: one BF16 GEMM over [hi | lo]."""
    hi, lo = split_bf16(g)
    split = torch.cat([hi, lo], dim=1)
    stacked = torch.cat([weight, weight], dim=0)
    if split.is_cuda:
        return torch.mm(split, stacked)   # BF16 tensor cores, FP32 accumulation, rounded once
    return torch.mm(split.float(), stacked.float()).to(torch.bfloat16)


def gating_wgrad(g: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """g [T, E] FP32, inp [T, H] BF16 -> dL/dw [E, H] FP32 (before the cast to the weight's dtype)."""
    hi, lo = split_bf16(g)
    both = mm_fp32_out(torch.cat([hi, lo], dim=1).t(), inp)   # [2E, H]
    e = g.shape[1]
    return both[:e] + both[e:]


class _GatingGEMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, weight, bias):
        ctx.save_for_backward(inp, weight)
        ctx.has_bias = bias is not None
        x = inp.reshape(-1, inp.shape[-1])
        logits = mm_fp32_out(x, weight.t())
        if bias is not None:
            logits = logits + bias.float()
        return logits.view(*inp.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_logits):
        inp, weight = ctx.saved_tensors
        g = grad_logits.reshape(-1, weight.shape[0]).float().contiguous()
        x = inp.reshape(-1, inp.shape[-1])
        grad_inp = gating_dgrad(g, weight).to(inp.dtype).view(inp.shape)
        grad_w = gating_wgrad(g, x).to(weight.dtype)
        grad_b = g.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_inp, grad_w, grad_b


def tensor_core_gating_applies(inp: torch.Tensor, weight: torch.Tensor, router_dtype: Optional[str]) -> bool:
    """Whether `gating_logits` computes what Megatron's gating would: FP32 logits asked for
    (`--moe-router-dtype fp32`) from BF16 input and weight (FP16 gradients would lose their small
    values in the split, FP64 is not this function)."""
    return (router_dtype == "fp32" and inp.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and inp.device == weight.device)   # (else Megatron's gating, which moves the weight)


def gating_logits(inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """inp [..., H] BF16, weight [E, H] BF16, bias [E] or None -> logits [..., E] FP32, with
    Megatron's gradients (BF16 to inp, the weight's dtype to weight and bias)."""
    return _GatingGEMM.apply(inp, weight, bias)
