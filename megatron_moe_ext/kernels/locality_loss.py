"""LocMoE's locality loss from the fused router's score sums in one kernel (issue 16: LocMoE's
router within 10% of top-k's).

`routing/locality.locality_kl_from_sums` is the loss in plain torch: about eight small kernels
forward (the count, two clamps, a division, a log, a subtraction, a product, a sum), as many
backward, plus the statistics' casts and indexed adds. In a captured router each costs a few
microseconds, which made LocMoE's router 15-21% slower than top-k's (docs/performance.md
section 3). `scaled_locality_kl` computes, for score sums s [E] over `count` tokens,

    d_c = s / max(count, 1);   t_e = log(max(d_c_e, f)) - log D_l_e   (f: routing/locality.D_C_FLOOR)
    loss = mu * sum_e d_c_e * t_e                     (mu * KL(D_c || D_l))
    d loss / d s_e = mu * (t_e + [d_c_e > f]) / max(count, 1)

in one Triton program that also stores the gradient vector and adds KL and 1 to the router's
float64 statistics; the backward is one multiply. `scaled_locality_kl_reference` is the same in
plain torch (the reference of the tests, and the path where Triton cannot run).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_moe_ext.kernels.triton_support import tl, triton, use_triton
from megatron_moe_ext.routing.locality import D_C_FLOOR, locality_kl_from_sums


def scaled_locality_kl_reference(score_sums: torch.Tensor, count: int, log_d_l: torch.Tensor, mu: float,
                                 stats: Optional[torch.Tensor] = None,
                                 stat_slots: Tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Plain torch: mu * KL from the sums (autograd through torch), and the statistics' update."""
    kl = locality_kl_from_sums(score_sums, score_sums.new_full((1,), count), log_d_l)
    if stats is not None:
        with torch.no_grad():
            stats[stat_slots[0]] += kl.detach().to(stats.dtype)
            stats[stat_slots[1]] += 1.0
    return mu * kl


if triton is not None:

    @triton.jit
    def _kl_kernel(s_ptr, logd_ptr, out_ptr, g_ptr, stats_ptr, E, inv_count, mu, floor,
                   SUM_SLOT: tl.constexpr, COUNT_SLOT: tl.constexpr, HAS_STATS: tl.constexpr,
                   BE: tl.constexpr):
        cols = tl.arange(0, BE)
        m = cols < E
        d_c = tl.load(s_ptr + cols, mask=m, other=0.0) * inv_count
        t = tl.log(tl.maximum(d_c, floor)) - tl.load(logd_ptr + cols, mask=m, other=0.0)
        kl = tl.sum(tl.where(m, d_c * t, 0.0), axis=0)
        tl.store(out_ptr, mu * kl)
        tl.store(g_ptr + cols, mu * (t + (d_c > floor).to(tl.float32)) * inv_count, mask=m)
        if HAS_STATS:   # one program: plain read-modify-writes, no atomics needed
            tl.store(stats_ptr + SUM_SLOT, tl.load(stats_ptr + SUM_SLOT) + kl.to(tl.float64))
            tl.store(stats_ptr + COUNT_SLOT, tl.load(stats_ptr + COUNT_SLOT) + 1.0)


class _ScaledLocalityKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, score_sums, count, log_d_l, mu, stats, stat_slots):
        s = score_sums.float().contiguous()
        E = s.shape[0]
        out = torch.empty((), dtype=torch.float32, device=s.device)
        g = torch.empty_like(s)
        _kl_kernel[(1,)](s, log_d_l.float().contiguous(), out, g, s if stats is None else stats,
                         E, 1.0 / max(count, 1), float(mu), D_C_FLOOR,
                         SUM_SLOT=stat_slots[0], COUNT_SLOT=stat_slots[1], HAS_STATS=stats is not None,
                         BE=triton.next_power_of_2(E))
        ctx.save_for_backward(g)
        ctx.in_dtype = score_sums.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (g * grad_out).to(ctx.in_dtype), None, None, None, None, None


def scaled_locality_kl(score_sums: torch.Tensor, count: int, log_d_l: torch.Tensor, mu: float,
                       stats: Optional[torch.Tensor] = None,
                       stat_slots: Tuple[int, int] = (0, 1)) -> torch.Tensor:
    """score_sums [E] (differentiable: the softmax scores summed over `count` tokens), log_d_l [E]
    -> mu * KL(D_c || D_l), a 0-d float32 tensor; with `stats` (float64 on the same device), adds
    KL to stats[stat_slots[0]] and 1 to stats[stat_slots[1]]. One Triton kernel forward and one
    multiply backward on CUDA (and on CPU under TRITON_INTERPRET=1), else the plain-torch
    reference; float64 sums take the reference (the kernel computes in float32)."""
    if log_d_l.dim() != 1 or log_d_l.shape != score_sums.shape:
        raise ValueError(f"scaled_locality_kl takes score sums and log D_l of one source rank, both [E]; "
                         f"got {tuple(score_sums.shape)} and {tuple(log_d_l.shape)}.")
    if not use_triton(score_sums) or score_sums.dtype == torch.float64:
        return scaled_locality_kl_reference(score_sums, count, log_d_l, mu, stats, stat_slots)
    return _ScaledLocalityKL.apply(score_sums, int(count), log_d_l, float(mu), stats, tuple(stat_slots))
