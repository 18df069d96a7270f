"""The router-weighted SwiGLU and GELU Triton kernels (experts/weighted_activation.py, forward and
backward) against float64 autograd, run on CPU through Triton's interpreter. The compiled kernels
on the GPU: tests/test_gpu_kernels.py (`pytest -m gpu`)."""

_CHECK = r"""
import torch
from megatron_moe_ext.experts.weighted_activation import (
    _WeightedAct, weighted_gelu, weighted_gelu_reference, weighted_swiglu, weighted_swiglu_reference)
torch.manual_seed(0)
for glu in (True, False):
    act, ref_fn = (weighted_swiglu, weighted_swiglu_reference) if glu else (weighted_gelu, weighted_gelu_reference)
    for t, f in [(7, 24), (3, 2500)]:  # one block per row; several blocks with a ragged tail
        x = torch.randn(t, (2 if glu else 1) * f, dtype=torch.float32) * 2
        p = torch.rand(t, dtype=torch.float32)
        dy = torch.randn(t, f, dtype=torch.float32)
        xi, pi = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        y = _WeightedAct.apply(xi, pi, glu)
        y.backward(dy)
        xr, pr = x.double().requires_grad_(True), p.double().requires_grad_(True)
        yr = ref_fn(xr, pr)   # float64 autograd through the plain reference
        yr.backward(dy.double())
        rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
        assert rel(y, yr) < 1e-6 and rel(xi.grad, xr.grad) < 1e-6 and rel(pi.grad, pr.grad) < 1e-5, (
            glu, rel(y, yr), rel(xi.grad, xr.grad), rel(pi.grad, pr.grad))
        assert type(act(x.requires_grad_(), p).grad_fn).__name__ == "_WeightedActBackward"
        assert torch.allclose(ref_fn(x.detach(), p), y.detach(), atol=1e-6)
    e = torch.empty(0, 8)
    assert act(e, torch.empty(0)).shape == (0, 4 if glu else 8)
print("ok")
"""


def test_weighted_activation_kernels_match_float64_autograd():
    """SwiGLU and GELU; float32 in and out: within 1e-6 of the output's max (single rounding of float32 math);
    the probability gradient sums F products, 1e-5."""
    from conftest import run_interpreted

    run_interpreted(_CHECK)
