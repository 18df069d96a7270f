"""kernels/locality_loss.py against the plain-torch locality loss in float64
(routing/locality.locality_kl_from_sums): mu * KL, its gradient with respect to the score sums,
and the statistics' update, on fresh random sums, an expert with no score at all included (the
clamp's branch). The kernel computes in float32: tolerance 1e-5 relative (a sum of E float32
terms), 1e-7 absolute."""

import pytest
import torch

from megatron_moe_ext.kernels.locality_loss import scaled_locality_kl
from megatron_moe_ext.routing.locality import locality_kl_from_sums, localized_distribution

CASES = [(16, 96, 0.01, 1), (60, 37, 0.5, 2), (128, 8192, 1.0, 3)]


def _kernel_case(E: int, count: int, mu: float, seed: int, device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(seed)
    sums = torch.rand(E, generator=g, dtype=torch.float64)
    sums[E // 3] = 0.0                                     # an expert no token scored
    sums = sums / sums.sum() * count                       # softmax rows sum to 1: the sums to count
    mask = torch.rand(E, generator=g) < 0.4
    mask[0] = True
    log_d_l = torch.log(localized_distribution(mask, 1e-3))
    ref_in = sums.clone().requires_grad_(True)
    ref = mu * locality_kl_from_sums(ref_in, torch.tensor([float(count)], dtype=torch.float64), log_d_l)
    up = torch.rand((), generator=g, dtype=torch.float64) + 0.5   # an upstream gradient not 1
    (ref * up).backward()

    x = sums.float().to(device).requires_grad_(True)
    stats = torch.tensor([0.25, 3.0, 7.0], dtype=torch.float64, device=device)
    got = scaled_locality_kl(x, count, log_d_l.float().to(device), mu, stats=stats, stat_slots=(0, 1))
    assert got.dtype == torch.float32 and got.dim() == 0
    (got * up.float().to(device)).backward()
    got, grad, stats = got.cpu(), x.grad.cpu(), stats.cpu()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    kl = ref.detach() / mu
    torch.testing.assert_close(stats, torch.stack([0.25 + kl, torch.tensor(4.0, dtype=torch.float64),
                                                   torch.tensor(7.0, dtype=torch.float64)]),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_reference_path(case):
    """Without Triton's interpreter on CPU the function is the plain-torch reference."""
    _kernel_case(*case)


def check_kernel_runs(device: str) -> None:
    """Every case through the Triton kernel itself (counted), against the float64 reference."""
    import megatron_moe_ext.kernels.locality_loss as ll

    seen = []
    real = ll._ScaledLocalityKL.apply
    ll._ScaledLocalityKL.apply = lambda *a: seen.append(1) or real(*a)
    try:
        for c in CASES:
            _kernel_case(*c, device=device)
    finally:
        ll._ScaledLocalityKL.apply = real
    assert len(seen) == len(CASES), "not the Triton kernel (is Triton importable?)"


def test_kernel_interpreted():
    """The kernel itself, interpreted on CPU (TRITON_INTERPRET=1 in a child process: the
    interpreter is chosen when Triton compiles); compiled: tests/test_gpu_kernels.py."""
    from conftest import run_interpreted

    run_interpreted("import test_locality_loss_kernel as t\nt.check_kernel_runs('cpu')\nprint('ok')\n")


def test_refuses_per_source_sums():
    with pytest.raises(ValueError, match="one source rank"):
        scaled_locality_kl(torch.ones(8), 4, torch.zeros(2, 4), 0.1)
