"""kernels/gather_permute.py against Megatron's unfused permute and unpermute (moe_utils), the
reference: the same rows in the same order, and the same sums and gradients, on fresh random
routing maps. Float64, so the only difference is summation order: tolerance 1e-12 relative."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import permute, unpermute

from megatron_moe_ext.kernels.gather_permute import (
    gather_permute,
    gather_unpermute,
    permutation_maps,
    permute_probs,
)


def _routing_map(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    return torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx, True)


@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (64, 16, 4), (20, 128, 8), (5, 4, 4)])
def test_same_as_megatrons_permutation(T, E, k):
    H = 24
    rmap = _routing_map(T, E, k, seed=T * E + k)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    maps = permutation_maps(rmap, k)

    probs = torch.rand(T, E, dtype=torch.float64) * rmap
    probs_ref = probs.clone().requires_grad_(True)
    probs.requires_grad_(True)
    rows = gather_permute(x, maps)
    rows_ref, row_probs_ref, sorted_idx, _, _ = permute(x_ref, rmap, probs=probs_ref, num_out_tokens=T * k)
    assert torch.equal(maps.token_of_row, sorted_idx) and torch.equal(rows, rows_ref)
    row_probs = permute_probs(probs, maps)
    assert torch.equal(row_probs, row_probs_ref)
    assert torch.equal(maps.tokens_per_expert, rmap.sum(0))
    g = torch.randn(T * k, dtype=torch.float64)
    row_probs.backward(g)
    row_probs_ref.backward(g)
    assert torch.equal(probs.grad, probs_ref.grad)

    w = torch.randn(T * k, H, dtype=torch.float64)   # an expert output that differs per row
    out = gather_unpermute(rows * w, maps)
    out_ref = unpermute(rows_ref * w, sorted_idx, restore_shape=torch.Size((T, H)), routing_map=rmap)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)

    dy = torch.randn(T, H, dtype=torch.float64)
    out.backward(dy)
    out_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_a_token_with_fewer_experts_sums_only_its_own():
    """Where a token has fewer than k experts (not the dropless case), its missing slots are not
    summed: the unpermutation adds exactly the routed pairs' rows."""
    rmap = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    maps = permutation_maps(rmap, 2)
    assert maps.valid.tolist() == [[True, True], [True, False], [True, True]]
    rows = torch.arange(6, dtype=torch.float64).view(6, 1)   # row r carries the value r
    out = gather_unpermute(rows, maps).view(-1)
    flat = maps.flat_sorted.tolist()
    routed = {(f // 3, f % 3): r for r, f in enumerate(flat) if rmap[f % 3, f // 3]}
    want = [sum(r for (e, t), r in routed.items() if t == tok) for tok in range(3)]
    assert out.tolist() == want


def test_fewer_experts_no_nan_and_no_gradient_to_leftover_rows():
    """An inf in a row a token does not own stays out of that token (a mask, not a x 0), and the
    rows past the routed pairs get no gradient (their expert output was never written)."""
    rmap = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    maps = permutation_maps(rmap, 2)
    rows = torch.ones(6, 2, dtype=torch.float64)
    rows[maps.rows_of_token[1, 1]] = float("inf")   # the slot token 1 does not use points here
    rows.requires_grad_(True)
    out = gather_unpermute(rows, maps)
    assert torch.isfinite(out[1]).all()
    out.sum().backward()
    assert maps.row_valid.tolist() == [True] * 5 + [False]
    assert rows.grad[~maps.row_valid].abs().sum() == 0 and (rows.grad[maps.row_valid] == 1).all()


def _kernel_case(T, E, k, dtype, seed, device="cpu"):
    """The Triton gather-sum against gather_sum_reference: a routing map where some tokens have
    fewer than k experts, and inf in the rows their unused slots point at."""
    from megatron_moe_ext.kernels.gather_permute import (
        _gather_rows,
        _gather_sum,
        gather_rows_reference,
        gather_sum_reference,
    )

    rmap = _routing_map(T, E, k, seed)
    rmap[::5, :] = False
    rmap[::5, 0] = True                       # every fifth token: one expert only
    maps = permutation_maps(rmap.to(device), k)
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(T * k, 200, generator=g).to(device=device, dtype=dtype)   # H not a power of 2
    leftover = (~maps.row_valid).nonzero()[:, 0]          # rows past the routed pairs
    maps.rows_of_token[~maps.valid] = leftover[0]          # unused slots point at one of them,
    src[leftover] = float("inf")                           # which holds inf
    got, ref = _gather_sum(src, maps), gather_sum_reference(src, maps)
    assert got.dtype == dtype and torch.isfinite(got).all()
    # the same FP32 sum of k values, maybe in another order: one rounding of the result's dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # the unpermutation's backward: the token rows' copies (inf included), zeros past the routed pairs
    tokens = src[:T] * 3
    rows, rows_ref = (f(tokens, maps.token_of_row, maps.row_valid) for f in (_gather_rows, gather_rows_reference))
    assert rows.dtype == dtype and torch.equal(rows, rows_ref) and (rows[leftover] == 0).all()


KERNEL_CASES = [(37, 8, 2, torch.float32, 1), (64, 16, 4, torch.float64, 2), (20, 128, 8, torch.bfloat16, 3)]


def test_triton_gather_sum_interpreted():
    """The kernels themselves, interpreted on CPU (TRITON_INTERPRET=1 in a child process); compiled:
    tests/test_gpu_kernels.py. Then this file's Megatron comparisons through the kernels."""
    from conftest import run_interpreted

    run_interpreted("import torch, test_gather_permute as t\n"
                    "from megatron_moe_ext.kernels.triton_support import use_triton\n"
                    "assert use_triton(torch.zeros(1))\n"
                    "for c in t.KERNEL_CASES: t._kernel_case(*c)\n"
                    "for c in [(37, 8, 2), (64, 16, 4), (20, 128, 8)]: t.test_same_as_megatrons_permutation(*c)\n"
                    "t.test_a_token_with_fewer_experts_sums_only_its_own()\n"
                    "t.test_fewer_experts_no_nan_and_no_gradient_to_leftover_rows()\n"
                    "print('ok')\n")
