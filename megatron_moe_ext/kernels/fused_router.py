"""The router's selection in one kernel each way: softmax scores, the policy's choice, the routing
probabilities and the load-balancing statistics (issue 16: the router is launch-bound).

Megatron's softmax router runs tens of small kernels per layer and direction: a top-k, a softmax
at the selection, a second softmax and top-k for the aux-loss scores, scatters for the routing map,
a column sum. `fused_select` does the per-token part in one Triton kernel forward and one backward
(plus the gating matmul before it, and a [E]-sized sum after it); `fused_select_reference` is the
same function in plain torch, the reference the tests compare it with and the path used where
Triton cannot run.

Per token t (logits x_t [E], float32):
  1. s_t = softmax(x_t)                                       (the aux-loss scores)
  2. key_t = (s_t if pre_softmax else x_t) + bias             (what Megatron's top-k ranks; bias:
     an optional [E] selection bias, e.g. LocMoE's local bias on this node's experts)
  3. selection: top-k of key_t, or C2R: e* = argmax key_t, then the k-1 best of partners[e*]
  4. probs_t: pre-softmax s_t at the selection, else the softmax of x_t over the selection;
     times the top-k scaling factor
Outputs: probs [T, E] (zero off the selection), routing_map [T, E] bool, indices [T, k] (column 0
the top-1), score_sums [E] = sum_t s_t (differentiable: the aux loss is E * coeff / (k T^2) *
sum_e tokens_e * score_sums_e, Megatron's switch loss), tokens_per_expert [E].
Backward (probs and score_sums): for each t, with g = d/dprobs_t and G = d/dscore_sums,
  d x_t = s_t * (G - <G, s_t>) + [pre: s_t * (v - <v, s_t>), v = scale * g on the selection]
                                 [post: q_t * (u - <u, q_t>) on the selection, u = scale * g,
                                  q_t = probs_t / scale]
Ties between equal keys may pick another expert than torch.topk (both are valid top-k choices;
frequent only with bf16 logits).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_moe_ext.kernels.triton_support import tl, triton, use_triton
from megatron_moe_ext.routing.policies.c2r import c2r_select
from megatron_moe_ext.routing.policies.topk import topk_select

BLOCK_T = 16   # tokens per program


def fused_select_reference(logits: torch.Tensor, topk: int, *, pre_softmax: bool = False,
                           scaling_factor: Optional[float] = None, bias: Optional[torch.Tensor] = None,
                           partners: Optional[torch.Tensor] = None):
    """Plain torch (autograd through torch): the same outputs as `fused_select` (float32, or
    float64 for float64 logits)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    s = torch.softmax(x, dim=-1)
    with torch.no_grad():
        key = (s if pre_softmax else x) + (0 if bias is None else bias.float())
        # the policies' own selection (routing/policies): what the kernel must reproduce
        idx = topk_select(key, topk) if partners is None else c2r_select(key, topk, partners.long())
    sel = torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, True)
    if pre_softmax:
        probs = s * sel
    else:
        probs = torch.softmax(x.masked_fill(~sel, float("-inf")), dim=-1)
    if scaling_factor:
        probs = probs * scaling_factor
    return probs, sel, idx, s.sum(0), sel.sum(0)


if triton is not None:

    @triton.jit
    def _router_fwd_kernel(x_ptr, bias_ptr, partners_ptr, probs_ptr, map_ptr, idx_ptr, ssum_ptr, cnt_ptr,
                           T, E, P, scale,
                           K: tl.constexpr, PRE: tl.constexpr, HAS_BIAS: tl.constexpr, C2R: tl.constexpr,
                           BT: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * E + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=float("-inf"))
        # 1. softmax scores
        mx = tl.max(x, axis=1)
        ex = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
        z = tl.sum(ex, axis=1)
        s = ex / z[:, None]
        # 2. the ranking key
        if PRE:
            key = tl.where(m2, s, float("-inf"))
        else:
            key = x
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
            key = key + b[None, :]
        key = tl.where(cmask[None, :], key, float("-inf"))
        # 3. selection
        top1 = tl.argmax(key, axis=1)
        sel = cols[None, :] == top1[:, None]
        tl.store(idx_ptr + rows * K, top1, mask=rmask)
        if C2R:
            pc = tl.arange(0, BP)
            pmask = rmask[:, None] & (pc[None, :] < P)
            cand = tl.load(partners_ptr + top1[:, None] * P + pc[None, :], mask=pmask, other=0)
            xc = tl.load(x_ptr + rows[:, None] * E + cand, mask=pmask, other=float("-inf"))
            if PRE:
                kc = tl.exp(xc - mx[:, None]) / z[:, None]
            else:
                kc = xc
            if HAS_BIAS:
                kc = kc + tl.load(bias_ptr + cand, mask=pmask, other=0.0)
            kc = tl.where(pmask, kc, float("-inf"))
            for j in tl.static_range(1, K):
                best = tl.argmax(kc, axis=1)
                e = tl.sum(tl.where(pc[None, :] == best[:, None], cand, 0), axis=1)
                tl.store(idx_ptr + rows * K + j, e, mask=rmask)
                sel = sel | (cols[None, :] == e[:, None])
                kc = tl.where(pc[None, :] == best[:, None], float("-inf"), kc)
        else:
            key = tl.where(cols[None, :] == top1[:, None], float("-inf"), key)
            for j in tl.static_range(1, K):
                e = tl.argmax(key, axis=1)
                tl.store(idx_ptr + rows * K + j, e, mask=rmask)
                sel = sel | (cols[None, :] == e[:, None])
                key = tl.where(cols[None, :] == e[:, None], float("-inf"), key)
        sel = sel & m2
        # 4. probabilities at the selection
        if PRE:
            p = tl.where(sel, s, 0.0)
        else:
            xs = tl.where(sel, x, float("-inf"))
            ms = tl.max(xs, axis=1)
            es = tl.where(sel, tl.exp(xs - ms[:, None]), 0.0)
            p = es / tl.sum(es, axis=1)[:, None]
        p = p * scale
        tl.store(probs_ptr + offs, p, mask=m2)
        tl.store(map_ptr + offs, sel.to(tl.int8), mask=m2)
        # 5. this block's column sums (summed over blocks afterwards: deterministic)
        tl.store(ssum_ptr + pid * E + cols, tl.sum(tl.where(m2, s, 0.0), axis=0), mask=cmask)
        tl.store(cnt_ptr + pid * E + cols, tl.sum(sel.to(tl.int32), axis=0), mask=cmask)

    @triton.jit
    def _router_bwd_kernel(x_ptr, probs_ptr, map_ptr, gp_ptr, gs_ptr, gx_ptr, T, E, scale,
                           PRE: tl.constexpr, HAS_GP: tl.constexpr, HAS_GS: tl.constexpr,
                           BT: tl.constexpr, BE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        m2 = (rows < T)[:, None] & (cols < E)[None, :]
        offs = rows[:, None] * E + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=float("-inf"))
        mx = tl.max(x, axis=1)
        ex = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
        gx = tl.zeros([BT, BE], dtype=tl.float32)
        if HAS_GS:   # the aux-loss scores' sum: one vector for every token
            G = tl.load(gs_ptr + cols, mask=cols < E, other=0.0)
            gx += s * (G[None, :] - tl.sum(s * G[None, :], axis=1)[:, None])
        if HAS_GP:
            sel = tl.load(map_ptr + offs, mask=m2, other=0) != 0
            g = tl.where(sel, tl.load(gp_ptr + offs, mask=m2, other=0.0) * scale, 0.0)
            if PRE:
                gx += s * (g - tl.sum(g * s, axis=1)[:, None])
            else:
                q = tl.where(sel, tl.load(probs_ptr + offs, mask=m2, other=0.0) / scale, 0.0)
                gx += q * (g - tl.sum(g * q, axis=1)[:, None])
        tl.store(gx_ptr + offs, gx, mask=m2)


class _FusedSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk, pre_softmax, scale, bias, partners):
        x = logits.float().contiguous()
        T, E = x.shape
        n_prog = triton.cdiv(T, BLOCK_T)
        probs = torch.empty_like(x)
        rmap = torch.empty((T, E), dtype=torch.int8, device=x.device)
        idx = torch.empty((T, topk), dtype=torch.int32, device=x.device)
        ssum = torch.empty((n_prog, E), dtype=torch.float32, device=x.device)
        cnt = torch.empty((n_prog, E), dtype=torch.int32, device=x.device)
        P = 1 if partners is None else partners.shape[1]
        part = idx if partners is None else partners.to(device=x.device, dtype=torch.int32).contiguous()
        b = x if bias is None else bias.float().contiguous()
        _router_fwd_kernel[(n_prog,)](x, b, part, probs, rmap, idx, ssum, cnt, T, E, P, scale,
                                      K=topk, PRE=pre_softmax, HAS_BIAS=bias is not None, C2R=partners is not None,
                                      BT=BLOCK_T, BE=triton.next_power_of_2(E), BP=triton.next_power_of_2(P))
        rmap = rmap.bool()
        ctx.save_for_backward(x, probs, rmap)
        ctx.pre, ctx.scale, ctx.in_dtype = pre_softmax, scale, logits.dtype
        ctx.mark_non_differentiable(rmap, idx, cnt)
        return probs, rmap, idx.long(), ssum.sum(0), cnt.sum(0)

    @staticmethod
    def backward(ctx, g_probs, _g_map, _g_idx, g_ssum, _g_cnt):
        x, probs, rmap = ctx.saved_tensors
        T, E = x.shape
        gx = torch.empty_like(x)
        gp = probs if g_probs is None else g_probs.float().contiguous()
        gs = probs if g_ssum is None else g_ssum.float().contiguous()
        _router_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            x, probs, rmap.view(torch.int8), gp, gs, gx, T, E, ctx.scale,
            PRE=ctx.pre, HAS_GP=g_probs is not None, HAS_GS=g_ssum is not None,
            BT=BLOCK_T, BE=triton.next_power_of_2(E))
        return gx.to(ctx.in_dtype), None, None, None, None, None


def fused_select(logits: torch.Tensor, topk: int, *, pre_softmax: bool = False,
                 scaling_factor: Optional[float] = None, bias: Optional[torch.Tensor] = None,
                 partners: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (probs [T, E] in the logits' dtype, routing_map [T, E] bool, indices
    [T, k] long, score_sums [E] float32, tokens_per_expert [E] int): one Triton kernel each way on
    CUDA (and on CPU under TRITON_INTERPRET=1), else `fused_select_reference`; the math in float32.
    `partners` LongTensor[E, P] (P >= k-1) selects C2R's way; `bias` [E] is added to the ranking
    key only. Ties go to the lower expert index (torch.topk's order is unspecified): with bf16
    router logits ties are common, so `--moe-router-dtype fp32` gives Megatron's choices exactly."""
    if partners is not None and partners.shape[1] < topk - 1:
        raise ValueError(f"C2R needs at least k-1 = {topk - 1} partners per expert, got {partners.shape[1]}.")
    if topk == 1:
        partners = None   # C2R's top-1 is top-k's (and T may be 0)
    if not use_triton(logits):
        out = fused_select_reference(logits, topk, pre_softmax=pre_softmax, scaling_factor=scaling_factor,
                                     bias=bias, partners=partners)
    else:
        out = _FusedSelect.apply(logits, topk, bool(pre_softmax), float(scaling_factor or 1.0), bias, partners)
    # probabilities in the logits' dtype, as Megatron's (moe_utils: probs.type_as(logits))
    return (out[0].to(logits.dtype),) + tuple(out[1:])
