"""FP8 (e4m3) quantization for the torch grouped experts: plain-torch references and fused Triton
kernels with the same contract.

Two forms:
  rows     t [M, K] -> q [M, K] e4m3, scale [M] float32 with t ~ q * scale[:, None];
           scale = max(amax_row, 1e-12) / 448. Activations and gradients, one scale per token,
           because a token's magnitude is what varies most in a batch.
  weight   W [G, N, K] -> q [G, N, K], qt [G, K, N] (the same values, transposed: dgrad's
           operand must be column-major for the FP8 GEMM), scale [G] float32: one scale per
           expert, so that one quantization serves both the forward and the dgrad GEMM.

The Triton kernels read each element once per pass (rows: an amax pass and a cast pass over
the same row, the second mostly from cache; weight: torch's fused inf-norm for the amax, then
one tiled cast that writes q and qt together). The eager torch forms take 4-6 passes. Both
saturate at +-448 before the cast, so rounding past 448 never turns into NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch

E4M3_MAX = 448.0
AMAX_EPS = 1e-12

from megatron_moe_ext.kernels.triton_support import tl, triton, use_triton


def quantize_rows_reference(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """t [..., K] -> (q float8_e4m3fn [..., K], scale float32 [...]), plain torch."""
    amax = torch.linalg.vector_norm(t.detach(), ord=float("inf"), dim=-1, dtype=torch.float32)
    amax = amax.clamp(min=AMAX_EPS)
    inv, scale = _inverse_and_scale(amax)
    q = (t.detach().float() * inv.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def quantize_weight_reference(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [G, N, K] -> (q [G, N, K], qt [G, K, N] contiguous, scale [G]), plain torch."""
    amax = torch.linalg.vector_norm(w.detach(), ord=float("inf"), dim=(1, 2), dtype=torch.float32)
    inv, scale = _inverse_and_scale(amax.clamp(min=AMAX_EPS))
    q = (w.detach().float() * inv.view(-1, 1, 1)).clamp(-E4M3_MAX, E4M3_MAX)
    q = q.to(torch.float8_e4m3fn)
    return q, q.transpose(-2, -1).contiguous(), scale


def _inverse_and_scale(amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(448 / amax, amax / 448) as correctly rounded tensor-by-tensor divisions: torch turns a
    division by or of a Python scalar into a reciprocal and a product, which the kernels would
    not reproduce bit for bit."""
    e4m3_max = torch.full_like(amax, E4M3_MAX)
    return e4m3_max / amax, amax / e4m3_max


def quantize_rows(t: torch.Tensor, out_dtype=torch.float8_e4m3fn) -> Tuple[torch.Tensor, torch.Tensor]:
    """t [M, K] (any float dtype) -> (q [M, K] e4m3, scale [M] float32); fused where possible.
    out_dtype=float32 keeps the scaled, saturated values before the cast (tests: Triton's CPU
    interpreter does not cast to float8 like the GPU)."""
    if not use_triton(t) or t.dim() != 2:
        return quantize_rows_reference(t)
    t = t.detach().contiguous()
    m, k = t.shape
    q = torch.empty(m, k, dtype=out_dtype, device=t.device)
    scale = torch.empty(m, dtype=torch.float32, device=t.device)
    if m:
        block = min(triton.next_power_of_2(max(k, 16)), 4096)
        _rows_kernel[(m,)](t, q, scale, k, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, scale


def quantize_weight(w: torch.Tensor, out_dtype=torch.float8_e4m3fn) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [G, N, K] -> (q [G, N, K], qt [G, K, N], scale [G] float32); fused where possible.
    out_dtype as in `quantize_rows`."""
    if not use_triton(w):
        return quantize_weight_reference(w)
    w = w.detach().contiguous()
    g, n, k = w.shape
    amax = torch.linalg.vector_norm(w, ord=float("inf"), dim=(1, 2), dtype=torch.float32)
    inv, scale = _inverse_and_scale(amax.clamp(min=AMAX_EPS))
    q = torch.empty(g, n, k, dtype=out_dtype, device=w.device)
    qt = torch.empty(g, k, n, dtype=out_dtype, device=w.device)
    bn, bk = 64, 64
    _cast_transpose_kernel[(g, triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w, q, qt, inv, n, k, BN=bn, BK=bk, num_warps=4)
    return q, qt, scale


if triton is not None:

    @triton.jit
    def _rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * K
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + base + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.maximum(tl.max(amax, axis=0), 1e-12)
        inv = tl.math.div_rn(448.0, a)  # IEEE division, as torch's (Triton's `/` is approximate)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + base + offs, mask=offs < K, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(v * inv, -448.0), 448.0)
            tl.store(q_ptr + base + offs, v.to(q_ptr.dtype.element_ty), mask=offs < K)
        tl.store(s_ptr + row, tl.math.div_rn(a, 448.0))

    @triton.jit
    def _cast_transpose_kernel(w_ptr, q_ptr, qt_ptr, inv_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.program_id(2) * BK + tl.arange(0, BK)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        inv = tl.load(inv_ptr + g)
        base = g * N * K
        v = tl.load(w_ptr + base + rn[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(v * inv, -448.0), 448.0).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + base + rn[:, None] * K + rk[None, :], v, mask=mask)
        tl.store(qt_ptr + base + rk[None, :] * N + rn[:, None], v, mask=mask)
