"""The torch expert backend's compiled GPU kernels against their plain references: the Triton FP8
quantizers against the eager torch quantizers, the FP8 grouped GEMM (torch._scaled_grouped_mm)
against the float32 emulation of the same quantized operands, and the weighted SwiGLU Triton
kernels against float64 autograd. Fresh random inputs (fixed seeds).

    pytest -m gpu -rs tests/test_gpu_kernels.py          (on the GPU machine: benchmarks/run_gpu_tests.sh)

Without CUDA every test here skips. The CPU counterparts run everywhere: the same Triton kernels
under TRITON_INTERPRET=1 (tests/test_fp8_experts.py, tests/test_weighted_activation_kernels.py) and the
emulated FP8 path (tests/test_fp8_experts.py). Timings: benchmarks/expert_kernels_gpu.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: compiled Triton kernels and torch's FP8 grouped GEMM "
                                            "(CPU variants: tests/test_fp8_experts.py, tests/test_weighted_activation_kernels.py)"),
]

# The plugin's own FP8 condition (fp8_grouped_mlp.fp8_supported): e4m3 casts in Triton and FP8 GEMMs
# need Ada/Hopper or newer. (Without CUDA the module's skip above gives the reason.)
fp8 = pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability() < (8, 9),
                         reason="FP8 (e4m3) needs compute capability >= 8.9 (Ada, Hopper or newer): "
                                "Triton's e4m3 cast and torch._scaled_grouped_mm")

DEV = "cuda"


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (float8 compared as bytes: NaN-safe and exact)."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return int((a != b).sum().item())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (b the reference)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --- FP8 quantizers: Triton kernels vs the eager torch references -----------------------------
# Tolerance 0 (bit for bit): both compute the same float32 product x * (448 / amax) with an
# IEEE-rounded division, saturate at +-448 and cast with the GPU's round-to-nearest; the scale is
# the same correctly rounded amax / 448. Any differing bit is a kernel bug.


@fp8
@pytest.mark.parametrize("shape", [(16384, 2048), (300, 14336), (5, 48)],
                         ids=["16384x2048-one-block", "300x14336-several-blocks", "5x48-masked-tail"])
def test_quantize_rows_equals_reference_bit_for_bit(shape):
    from megatron_moe_ext.experts import fp8_quant as fq

    torch.manual_seed(0)
    x = torch.randn(*shape, device=DEV, dtype=torch.bfloat16) * 3
    x[0, 1] = 900.0  # an outlier: its row gets its own scale
    assert fq.use_triton(x), "Triton is not importable: quantize_rows would compare the reference with itself"
    q, s = fq.quantize_rows(x)
    qr, sr = fq.quantize_rows_reference(x)
    assert q.dtype == qr.dtype == torch.float8_e4m3fn
    assert _differing(q, qr) == 0, f"{_differing(q, qr)} of {q.numel()} e4m3 values differ"
    assert torch.equal(s, sr), f"{_differing(s, sr)} of {s.numel()} scales differ"


@fp8
@pytest.mark.parametrize("shape", [(8, 200, 300), (2, 64, 128)], ids=["8x200x300-ragged-tiles", "2x64x128-whole-tiles"])
def test_quantize_weight_equals_reference_bit_for_bit(shape):
    from megatron_moe_ext.experts import fp8_quant as fq

    torch.manual_seed(0)
    w = torch.randn(*shape, device=DEV, dtype=torch.bfloat16)
    assert fq.use_triton(w), "Triton is not importable: quantize_weight would compare the reference with itself"
    q, qt, s = fq.quantize_weight(w)
    qr, qtr, sr = fq.quantize_weight_reference(w)
    assert qt.shape == (shape[0], shape[2], shape[1]) and qt.is_contiguous()
    assert _differing(q, qr) == 0, f"q: {_differing(q, qr)} of {q.numel()} differ"
    assert _differing(qt, qtr) == 0, f"qt: {_differing(qt, qtr)} of {qt.numel()} differ"
    assert torch.equal(s, sr), f"scales: {s} vs {sr}"


# --- FP8 grouped GEMM: torch._scaled_grouped_mm vs the float32 emulation -----------------------
# Both paths quantize the same operands with the same quantizers; they differ only in the matmul:
# the kernel accumulates in float32 in its own order (CUTLASS tiles) and rounds to BF16, the
# emulation multiplies the dequantized operands in float32 and rounds to BF16. Two float32 sums
# that differ in their last bits can round to neighbouring BF16 values, one BF16 spacing apart
# (up to 2^-7 = 7.8e-3 of the element); seen on an H100: 4.7e-3 (forward), 6.5e-3 (dgrad) of the
# output's max. Tolerance: 1e-2 of the output's max; a wrong scale layout or group offset gives O(1).
GEMM_TOL = 1e-2


@functools.lru_cache(maxsize=1)
def _fp8_gemm_outputs():
    """{(kernel|emulation, forward|dgrad): float32 tensor}, computed once for both tests."""
    from megatron_moe_ext.experts import fp8_quant as fq
    from megatron_moe_ext.experts.fp8_grouped_mlp import _FP8GroupedMM

    torch.manual_seed(0)
    tpe = torch.tensor([700, 0, 1300, 48, 2000, 1, 900, 1144], device=DEV)  # an idle expert, a 1-row one
    offs = torch.cumsum(tpe, 0).to(torch.int32)
    x = torch.randn(int(tpe.sum()), 1024, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(8, 512, 1024, device=DEV) * 0.02).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(x.shape[0], 512, device=DEV, dtype=torch.bfloat16)
    wq, wqt, ws = fq.quantize_weight(w)
    out = {}
    for label, emulate in (("kernel", False), ("emulation", True)):
        xi = x.clone().requires_grad_(True)
        y = _FP8GroupedMM.apply(xi, w, wq, wqt, ws, offs, emulate)
        y.backward(g)
        out[label, "forward"], out[label, "dgrad"] = y.detach().float(), xi.grad.float()
    return out


@fp8
@pytest.mark.parametrize("which", ["forward", "dgrad"])
def test_scaled_grouped_mm_matches_the_float32_emulation(which):
    out = _fp8_gemm_outputs()
    kernel, emulation = out["kernel", which], out["emulation", which]
    assert torch.isfinite(kernel).all()
    rel = _rel(kernel, emulation)
    assert rel < GEMM_TOL, f"{which}: rel err {rel:.2e} (tolerance {GEMM_TOL})"


# --- weighted SwiGLU and GELU: Triton forward and backward vs float64 autograd ------------------
# The reference takes the same (already rounded) inputs in float64, so the kernel's error is its
# own: float32 arithmetic rounded once to the input dtype.
SWIGLU_TOL = {
    # float32 in and out: a few float32 roundings per element (~1e-7) plus d_probs' sum of F
    # products in float32 (~F * 2^-24 of the sum's terms at worst): 1e-5 of the max.
    torch.float32: 1e-5,
    # bf16 outputs: one round-to-nearest to bf16's 8 significant bits, at most 2^-8 = 3.9e-3 of
    # the element (d_probs stays float32); 1e-2 of the max leaves room without hiding a wrong
    # formula (O(1)).
    torch.bfloat16: 1e-2,
}


@functools.lru_cache(maxsize=None)
def _activation_errors(glu: bool, dtype: torch.dtype, t: int, f: int) -> dict:
    from megatron_moe_ext.experts.weighted_activation import (
        weighted_gelu,
        weighted_gelu_reference,
        weighted_swiglu,
        weighted_swiglu_reference,
    )

    torch.manual_seed(0)
    x = (torch.randn(t, (2 if glu else 1) * f, device=DEV) * 2).to(dtype).requires_grad_(True)
    pr = torch.rand(t, device=DEV, requires_grad=True)
    dy = torch.randn(t, f, device=DEV).to(dtype)
    y = (weighted_swiglu if glu else weighted_gelu)(x, pr)
    assert type(y.grad_fn).__name__ == "_WeightedActBackward", "not the Triton kernel (is Triton importable?)"
    y.backward(dy)
    xr, prr = x.detach().double().requires_grad_(True), pr.detach().double().requires_grad_(True)
    yr = (weighted_swiglu_reference if glu else weighted_gelu_reference)(xr, prr)   # float64 autograd
    yr.backward(dy.double())
    assert y.dtype == x.grad.dtype == dtype and pr.grad.dtype == torch.float32
    return {"out": _rel(y, yr), "d_fc1": _rel(x.grad, xr.grad), "d_probs": _rel(pr.grad, prr.grad)}


@pytest.mark.parametrize("which", ["out", "d_fc1", "d_probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("t,f", [(3000, 1408), (64, 2500)], ids=["3000x1408-one-block", "64x2500-several-blocks"])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_weighted_activation_matches_float64_autograd(act, t, f, dtype, which):
    rel = _activation_errors(act == "swiglu", dtype, t, f)[which]
    tol = SWIGLU_TOL[dtype]
    assert rel < tol, f"{act} {which} {dtype}: rel err {rel:.2e} (tolerance {tol})"


# --- the fused router selection: compiled Triton kernels vs the plain-torch reference ----------
# The CPU test (tests/test_fused_router.py) runs the same cases interpreted; here the compiled
# kernels on the GPU, plus the router's own sizes (8192 tokens, 16 and 128 experts, top-2/8).


@pytest.mark.parametrize("case", [(8192, 16, 2, False, None, False, None), (8192, 128, 8, False, None, False, None),
                                  (8192, 128, 8, True, 2.5, True, 15), (777, 60, 4, False, 1.0, True, 7)],
                         ids=["8192x16-top2", "8192x128-top8", "8192x128-c2r-pre-bias", "777x60-masked"])
def test_fused_router_matches_reference(case):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import test_fused_router as cpu

    with torch.device(DEV):
        torch.manual_seed(0)
        cpu._check_case(*case)


# --- the router's gating GEMM on tensor cores (kernels/router_gemm.py) ---------------------------
# The CPU test (tests/test_router_gemm.py) checks the split arithmetic with FP32 GEMMs; here the
# BF16 tensor-core GEMMs at the benchmark's sizes against Megatron's FP32 gating (FFMA without TE).


@pytest.mark.parametrize("e,bias", [(16, False), (128, True)], ids=["16E", "128E-bias"])
def test_gating_gemm_matches_megatrons_fp32_gating(e, bias):
    import sys

    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    from megatron_moe_ext.kernels import router_gemm

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import test_router_gemm as cpu

    assert router_gemm._mm_out_dtype_on_cuda(), "torch.mm(..., out_dtype=float32) is missing: the fallback runs"
    x, w, b, up = (t if t is None else t.to(DEV) for t in cpu._case(t=4096, h=2048, e=e, seed=e, bias=bias))
    ours = cpu._grads(lambda a, c, d: router_gemm.gating_logits(a, c, d), x, w, b, up)
    theirs = cpu._grads(lambda a, c, d: router_gating_linear(a, c, d, torch.float32), x, w, b, up)
    # another summation order over 2048 FP32 terms (and tensor-core vs FFMA accumulation)
    assert (ours[0] - theirs[0]).abs().max() <= 1e-5 * theirs[0].abs().max()
    u = up.abs().reshape(-1, e)
    scales = ((u @ w.float().abs()).view(x.shape), u.t() @ x.float().abs().reshape(-1, 2048), u.sum(0))
    for a, ref, scale in zip(ours[1:], theirs[1:], scales):
        if ref is not None:
            cpu._assert_within_one_bf16_step(a, ref, scale)


# --- the gather-sum of the device-splits permutation (kernels/gather_permute.py) -----------------
# The CPU test (tests/test_gather_permute.py) runs the kernel interpreted; here compiled, on the
# small cases and at the Qwen3-like layer's row count (8192 tokens x 8 rows; H 200, not a power of 2).


@pytest.mark.parametrize("case", [(37, 8, 2, torch.float32, 1), (20, 128, 8, torch.bfloat16, 3),
                                  (8192, 128, 8, torch.bfloat16, 4)], ids=["small-fp32", "small-bf16", "qwen3-like"])
def test_gather_sum_kernel_matches_reference(case):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import test_gather_permute as cpu

    cpu._kernel_case(*case, device=DEV)


# --- LocMoE's locality loss from the score sums (kernels/locality_loss.py) -------------------------
# CPU: tests/test_locality_loss_kernel.py (interpreted); here compiled, E = 16, 60, 128.


def test_locality_loss_kernel_matches_float64():
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import test_locality_loss_kernel as cpu

    cpu.check_kernel_runs(DEV)
