"""kernels/fused_router.py: the one-kernel router selection against its plain-torch reference
(the Triton kernels under TRITON_INTERPRET=1 on CPU, compiled under `pytest -m gpu`), and the
reference against Megatron's own routing functions: probabilities, routing map, aux-loss
statistics and gradients, for top-k (pre/post softmax, scaling, a selection bias) and C2R.

Tolerances: kernel vs reference 2e-6 absolute on probabilities (both float32, another order of
the same sums) and 1e-5 relative on gradients; reference (float64 here) vs Megatron, which
computes its softmax in float32: 1e-6 relative on values, 1e-5 on gradients."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_moe_ext.routing.policies.c2r import c2r_select

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _partners(E, P, g):
    dev = torch.get_default_device()
    return torch.stack([torch.cat([torch.arange(e), torch.arange(e + 1, E)])[
        torch.randperm(E - 1, generator=g, device="cpu")[:P].to(dev)] for e in range(E)])


CASES = [  # T, E, k, pre_softmax, scaling, bias, C2R partners
    (37, 16, 2, False, None, False, None),
    (64, 60, 4, True, 2.5, True, None),
    (5, 128, 8, False, 1.0, True, None),
    (50, 16, 1, False, None, False, None),
    (45, 16, 2, False, None, False, 1),
    (33, 64, 4, True, None, True, 7),
    (40, 128, 8, False, 2.0, False, 15),
]


def _check_case(T, E, k, pre, scale, has_bias, P):
    """One case, in a process where TRITON_INTERPRET=1 was set before Triton was imported."""
    import megatron_moe_ext.kernels.fused_router as fr

    g = torch.Generator().manual_seed(T * E + k)   # on the CPU; tensors on the default device
    x = torch.randn(T, E, generator=g, device="cpu").to(torch.get_default_device()).requires_grad_()
    bias = 0.1 * torch.randn(E, generator=g, device="cpu").to(x.device) if has_bias else None
    partners = _partners(E, P, g) if P else None
    kw = dict(pre_softmax=pre, scaling_factor=scale, bias=bias, partners=partners)
    got = fr.fused_select(x, k, **kw)
    ref = fr.fused_select_reference(x, k, **kw)
    assert "Fused" in type(got[0].grad_fn).__name__   # the kernel ran
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=2e-6)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[4].long(), ref[4].long()) and int(got[4].sum()) == T * k
    gp, gs = (torch.randn(*shape, generator=g, device="cpu").to(x.device) for shape in ((T, E), (E,)))
    (g_got,) = torch.autograd.grad((got[0] * gp).sum() + (got[3] * gs).sum(), x)
    (g_ref,) = torch.autograd.grad((ref[0] * gp).sum() + (ref[3] * gs).sum(), x)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
    (g_aux,) = torch.autograd.grad((fr.fused_select(x, k, **kw)[3] * gs).sum(), x)   # probs unused
    (g_aux_ref,) = torch.autograd.grad((fr.fused_select_reference(x, k, **kw)[3] * gs).sum(), x)
    torch.testing.assert_close(g_aux, g_aux_ref, rtol=1e-5, atol=1e-6)


def check_all_cases():
    for case in CASES:
        _check_case(*case)
    print("ok", len(CASES))


def test_kernel_matches_reference():
    """Every case of CASES through the Triton kernels (interpreted on CPU) against the reference."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", "import test_fused_router as t; t.check_all_cases()"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=os.path.join(REPO, "tests"))
    assert out.returncode == 0 and f"ok {len(CASES)}" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("pre,scale", [(False, None), (True, None), (False, 2.5), (True, 1.5)])
@pytest.mark.parametrize("c2r", [False, True])
def test_reference_is_megatrons_routing(pre, scale, c2r):
    """Probabilities and map as Megatron's topk_routing_with_score_function (with C2R's indices
    for C2R), the score sums as its aux-loss scores' column sums, and the switch loss from the
    sums (value and gradient) as Megatron's from the full scores; float64."""
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        switch_load_balancing_loss_func,
        topk_routing_with_score_function,
    )

    from megatron_moe_ext.kernels.fused_router import fused_select_reference

    g = torch.Generator().manual_seed(11)
    T, E, k = 96, 16, 4
    x = torch.randn(T, E, generator=g, dtype=torch.float64, requires_grad=True)
    partners = _partners(E, 5, g) if c2r else None
    probs, rmap, idx, ssum, cnt = fused_select_reference(x, k, pre_softmax=pre, scaling_factor=scale,
                                                         partners=partners)
    key = torch.softmax(x, -1) if pre else x
    indices = c2r_select(key.detach(), k, partners) if c2r else None
    m_probs, m_map = topk_routing_with_score_function(x, k, use_pre_softmax=pre, scaling_factor=scale,
                                                      precomputed_indices=indices)
    assert torch.equal(rmap, m_map)
    torch.testing.assert_close(probs.double(), m_probs.double(), rtol=1e-6, atol=1e-7)
    _, scores = compute_routing_scores_for_aux_loss(x, k, "softmax")
    torch.testing.assert_close(ssum.double(), scores.sum(0).double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(cnt, m_map.sum(0))

    def loss(s):
        return switch_load_balancing_loss_func(s, m_map.sum(0), T, k, E, 1e-2)

    ours, megatrons = loss(ssum.unsqueeze(0)), loss(scores)
    torch.testing.assert_close(ours.double(), megatrons.double(), rtol=1e-6, atol=0)
    (g1,) = torch.autograd.grad(ours, x, retain_graph=True)
    (g2,) = torch.autograd.grad(megatrons, x)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)


def test_probabilities_in_the_logits_dtype():
    """As Megatron's (probs.type_as(logits)): a bf16 router gives bf16 probabilities, computed
    in float32 and rounded once; top-1 C2R needs no partners (T may be 0)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from megatron_moe_ext.kernels.fused_router import fused_select

    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=g).bfloat16()
    probs, rmap = fused_select(x, 2)[:2]
    m_probs, m_map = topk_routing_with_score_function(x, 2)
    assert probs.dtype == torch.bfloat16 == m_probs.dtype
    agree = (rmap == m_map).all(1)   # bf16 ties may pick the other expert
    assert agree.float().mean() > 0.9
    torch.testing.assert_close(probs[agree], m_probs[agree], rtol=0, atol=0)
    one = fused_select(x.float(), 1, partners=torch.empty(16, 0, dtype=torch.long))
    assert torch.equal(one[2][:, 0], x.float().argmax(1))


def test_falls_back_to_the_reference_without_triton():
    """Without CUDA and without the interpreter (this process), the reference runs."""
    from megatron_moe_ext.kernels.fused_router import fused_select

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    x = torch.randn(8, 16, requires_grad=True)
    assert "Fused" not in type(fused_select(x, 2)[0].grad_fn).__name__
