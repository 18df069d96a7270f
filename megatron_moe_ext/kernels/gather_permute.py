"""Token permutation for a dropless top-k layer whose both directions are gathers.

Megatron's unfused permutation (moe_utils.permute / unpermute, used without Transformer Engine)
sorts the (token, expert) pairs expert-major with an argsort and gathers the tokens: its backward
is an atomic `index_add` of N = T x k rows into T tokens, and the unpermutation is a
`scatter_add` of the expert outputs, whose atomics also make it order-dependent. On the H200 these
two took 1.6 ms beside 3.7 ms of expert GEMMs on a Qwen3-like layer (docs/performance.md
section 3). Dropless, every token has (at most) k rows, so the inverse map is a [T, k] table, and
summing a token's rows is a gather of k rows and a sum: no atomics, the same result every run.

    maps = permutation_maps(routing_map, k)     # Megatron's row order (experts, then tokens)
    rows = gather_permute(tokens, maps)         # [T, H] -> [N, H]; backward: gather-sum
    out = gather_unpermute(expert_out, maps)    # [N, H] -> [T, H]; backward: gather

The gather-sum (each token's k rows summed, twice per layer: the unpermutation and the
permutation's backward) is one Triton kernel on CUDA (`_gather_sum_kernel`: the k rows read once,
summed in FP32 (FP64 for FP64) in ascending expert order, rounded once). Plain torch elsewhere
(`gather_sum_reference`: index_select, a `where` mask, a sum), which on the H200 cost three passes
over the [T x k, H] rows, the masked `where` alone 1.06 ms of a 5.9 ms Qwen3-like layer
(docs/performance.md section 3). No Megatron. The reference for both is Megatron's permute and
unpermute (tests/test_gather_permute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_moe_ext.kernels.triton_support import tl, triton, use_triton


@dataclass
class PermutationMaps:
    """flat_sorted: LongTensor[N], the pairs in Megatron's order as expert * T + token;
    token_of_row: LongTensor[N]; rows_of_token: LongTensor[T, k], the row of each of a token's
    experts in ascending expert order; valid: BoolTensor[T, k], False where a token has fewer
    than k experts (its slot then points at row 0 and is not summed); row_valid: BoolTensor[N],
    False for the rows past the routed pairs (only then: Megatron's order fills N rows anyway),
    which get no gradient; prob_of_row: LongTensor[N], each row's pair as token * E + expert (its
    place in the [T, E] probabilities); tokens_per_expert: LongTensor[E]."""

    flat_sorted: torch.Tensor
    token_of_row: torch.Tensor
    rows_of_token: torch.Tensor
    valid: torch.Tensor
    row_valid: torch.Tensor
    prob_of_row: torch.Tensor
    tokens_per_expert: torch.Tensor


def permutation_maps(routing_map: torch.Tensor, topk: int) -> PermutationMaps:
    """routing_map: BoolTensor[T, E] with k True per token -> the maps for N = T x k rows.
    Static shapes only (no host read): capturable in a CUDA graph."""
    T, E = routing_map.shape
    n = T * topk
    # Megatron's order (moe_utils.permute): pairs expert-major, tokens ascending within an expert
    flat_map = routing_map.T.contiguous().reshape(-1)
    flat_sorted = flat_map.argsort(descending=True, stable=True)[:n]
    token_of_row = flat_sorted % T
    row_of_pair = torch.zeros(E * T, dtype=torch.long, device=routing_map.device)
    row_of_pair[flat_sorted] = torch.arange(n, device=routing_map.device)
    experts = routing_map.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :topk]  # [T, k]
    valid = routing_map.gather(1, experts)
    rows_of_token = row_of_pair.view(E, T).T.gather(1, experts)
    rows_of_token = torch.where(valid, rows_of_token, torch.zeros_like(rows_of_token))
    prob_of_row = token_of_row * E + flat_sorted // T
    # counted along the [E, T] copy's rows: contiguous, where routing_map.sum(0) reduces across
    # rows (a slow strided reduction)
    tokens_per_expert = flat_map.view(E, T).sum(1)
    return PermutationMaps(flat_sorted, token_of_row, rows_of_token, valid, flat_map[flat_sorted],
                           prob_of_row, tokens_per_expert)


def gather_sum_reference(src: torch.Tensor, maps: PermutationMaps) -> torch.Tensor:
    """src [N, H] -> [T, H]: each token's valid rows summed (in ascending expert order)."""
    T, k = maps.rows_of_token.shape
    rows = src.index_select(0, maps.rows_of_token.reshape(-1)).view(T, k, src.shape[-1])
    rows = torch.where(maps.valid.unsqueeze(-1), rows, rows.new_zeros(()))  # not x 0: inf x 0 is NaN
    return rows.sum(1)


if triton is not None:
    @triton.jit
    def _gather_sum_kernel(src_ptr, rows_ptr, valid_ptr, out_ptr, H, K: tl.constexpr, BH: tl.constexpr,
                           ACC: tl.constexpr):
        # one program: token t, columns [h0, h0 + BH); its K rows read once, summed in ACC (FP32,
        # FP64 for FP64 input)
        t = tl.program_id(0)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        inside = cols < H
        acc = tl.zeros([BH], dtype=ACC)
        for j in tl.static_range(K):
            row = tl.load(rows_ptr + t * K + j)
            ok = tl.load(valid_ptr + t * K + j) != 0
            # a masked load, not a multiply: a slot the token does not own may point at inf
            acc += tl.load(src_ptr + row * H + cols, mask=inside & ok, other=0.0).to(ACC)
        tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _row_gather_kernel(src_ptr, idx_ptr, valid_ptr, out_ptr, H, BH: tl.constexpr):
        # one program: row r, columns [h0, h0 + BH): src[idx[r]] where valid[r], else zeros
        r = tl.program_id(0)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        inside = cols < H
        row = tl.load(idx_ptr + r).to(tl.int64)
        ok = tl.load(valid_ptr + r) != 0
        x = tl.load(src_ptr + row * H + cols, mask=inside & ok, other=0.0)
        tl.store(out_ptr + r.to(tl.int64) * H + cols, x, mask=inside)


def gather_rows_reference(src: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """src [T, H], idx LongTensor[N] (< T), valid BoolTensor[N] -> [N, H]: src[idx], zero where
    not valid (a gather from src with a zero row appended)."""
    padded = torch.cat([src, src.new_zeros(1, src.shape[-1])])
    return padded.index_select(0, torch.where(valid, idx, src.shape[0]))


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """gather_rows_reference in one Triton kernel where it runs: no [T, H] copy with a zero row."""
    if not use_triton(src):
        return gather_rows_reference(src, idx, valid)
    src = src.contiguous()
    N, H = idx.shape[0], src.shape[-1]
    out = torch.empty(N, H, dtype=src.dtype, device=src.device)
    if N == 0:
        return out
    bh = min(1024, triton.next_power_of_2(H))
    _row_gather_kernel[(N, triton.cdiv(H, bh))](src, idx.contiguous(), valid.contiguous().view(torch.uint8),
                                                 out, H, BH=bh)
    return out


def _gather_sum(src: torch.Tensor, maps: PermutationMaps) -> torch.Tensor:
    """src [N, H] -> [T, H]: the Triton kernel where it runs, else the reference."""
    if not use_triton(src):
        return gather_sum_reference(src, maps)
    src = src.contiguous()
    T, k = maps.rows_of_token.shape
    H = src.shape[-1]
    out = torch.empty(T, H, dtype=src.dtype, device=src.device)
    if T == 0:
        return out
    bh = min(1024, triton.next_power_of_2(H))
    _gather_sum_kernel[(T, triton.cdiv(H, bh))](src, maps.rows_of_token.contiguous(),
                                                maps.valid.contiguous().view(torch.uint8), out, H, K=k, BH=bh,
                                                ACC=tl.float64 if src.dtype == torch.float64 else tl.float32)
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, maps):
        ctx.maps = maps
        return tokens.index_select(0, maps.token_of_row)

    @staticmethod
    def backward(ctx, grad_rows):
        return _gather_sum(grad_rows.contiguous(), ctx.maps), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, maps):
        ctx.maps = maps
        return _gather_sum(rows, maps)

    @staticmethod
    def backward(ctx, grad_tokens):
        # one gather from the tokens, zero for the rows past the routed pairs: not a mask over [N, H]
        return _gather_rows(grad_tokens, ctx.maps.token_of_row, ctx.maps.row_valid), None


class _PermuteProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs, maps):
        ctx.maps, ctx.shape = maps, probs.shape
        return probs.reshape(-1).index_select(0, maps.prob_of_row)

    @staticmethod
    def backward(ctx, grad_rows):
        # each pair is one row at most: a plain scatter, where indexing's backward (an accumulating
        # index_put) sorts the indices first
        grad = grad_rows.new_zeros(ctx.shape[0] * ctx.shape[1])
        return grad.scatter_(0, ctx.maps.prob_of_row, grad_rows).view(ctx.shape), None


def gather_permute(tokens: torch.Tensor, maps: PermutationMaps) -> torch.Tensor:
    """tokens [T, H] -> rows [N, H] in Megatron's order; the backward sums each token's k rows."""
    return _Permute.apply(tokens, maps)


def permute_probs(probs: torch.Tensor, maps: PermutationMaps) -> torch.Tensor:
    """probs [T, E] -> [N]: each row's routing probability, in the rows' order (Megatron's
    permute of the probabilities); the backward scatters them back."""
    return _PermuteProbs.apply(probs, maps)


def gather_unpermute(rows: torch.Tensor, maps: PermutationMaps) -> torch.Tensor:
    """rows [N, H] -> tokens [T, H], each token the sum of its rows; the backward gathers."""
    return _Unpermute.apply(rows, maps)
