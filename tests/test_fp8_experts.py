"""FP8 torch experts: quantizers (torch and the Triton kernels, the latter through Triton's CPU
interpreter), the emulated FP8 forward and dgrad against references, the weight-quantization
cache, and the refusal without an FP8 GPU. The GEMM kernel itself runs only on an FP8 GPU:
tests/test_gpu_kernels.py (`pytest -m gpu`) checks it against the emulation there."""


import pytest
import torch
from test_grouped_experts import E, H, _experts


def test_reference_quantizers_bound_the_error_and_share_the_transposed_copy():
    from megatron_moe_ext.experts.fp8_quant import (
        quantize_rows_reference,
        quantize_weight_reference,
    )

    torch.manual_seed(0)
    x = torch.randn(9, 48)
    x[2, 7] = 300.0  # its row gets its own scale
    q, s = quantize_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (9,)
    assert torch.equal(s, x.abs().amax(-1) / 448)
    # round to nearest: at most half an e4m3 spacing (2^-4 relative) per element
    assert ((q.float() * s[:, None] - x).abs() <= x.abs() * 2**-4 + 2**-10 * s[:, None]).all()
    assert q.float().abs().amax(-1).eq(448).all()  # each row's amax maps onto e4m3's largest value

    w = torch.randn(3, 16, 32)
    wq, wqt, ws = quantize_weight_reference(w)
    assert torch.equal(wqt.float(), wq.float().transpose(1, 2)) and wqt.is_contiguous()
    assert torch.equal(ws, w.abs().amax((1, 2)) / 448)
    assert ((wq.float() * ws[:, None, None] - w).abs() <= w.abs() * 2**-4 + 2**-10 * ws[:, None, None]).all()


_TRITON_CHECK = r"""
import torch
from megatron_moe_ext.experts import fp8_quant as fq
assert fq.use_triton(torch.zeros(1))
torch.manual_seed(0)
f32, e4m3 = torch.float32, torch.float8_e4m3fn
for shape in [(5, 48), (3, 5000)]:  # one block; several blocks per row with a ragged tail
    x = (torch.randn(*shape) * 3).bfloat16()
    x[1, 3] = 0.0
    x[2, 1] = 900.0
    v, s = fq.quantize_rows(x, out_dtype=f32)
    qr, sr = fq.quantize_rows_reference(x)
    assert torch.equal(s, sr), (s, sr)
    assert v.abs().max() <= 448 and torch.equal(v.to(e4m3).float(), qr.float())
z, sz = fq.quantize_rows(torch.zeros(2, 32), out_dtype=f32)
assert z.abs().max() == 0 and (sz > 0).all()  # zero rows: a tiny scale, no NaN
w = torch.randn(2, 70, 130).bfloat16()  # ragged tiles in both directions
v, vt, s = fq.quantize_weight(w, out_dtype=f32)
qr, qtr, sr = fq.quantize_weight_reference(w)
assert torch.equal(s, sr)
assert torch.equal(v.to(e4m3).float(), qr.float()) and torch.equal(vt, v.transpose(1, 2))
print("ok")
"""


def test_triton_quantizers_match_the_reference_in_the_interpreter():
    """Same scales and (after the cast) the same e4m3 values. The kernels write float32 here:
    Triton's interpreter casts to float8 wrongly (124.7 -> 64); the GPU's cast is checked in
    tests/test_gpu_kernels.py."""
    from conftest import run_interpreted

    run_interpreted(_TRITON_CHECK)


def test_fp8_emulation_forward_and_dgrad_against_references(megatron_cpu):
    from megatron_moe_ext.experts.fp8_grouped_mlp import (
        TorchFP8GroupedMLP,
        _FP8GroupedMM,
    )
    from megatron_moe_ext.experts.fp8_quant import (
        quantize_rows_reference,
        quantize_weight_reference,
    )

    torch.manual_seed(1)
    mod = _experts(megatron_cpu, True, cls=TorchFP8GroupedMLP, emulate=True)
    plain = _experts(megatron_cpu, True)
    plain.load_state_dict(mod.state_dict())
    tpe = torch.tensor([7, 2, 0, 6])
    x = torch.randn(15, H)
    x[3, 5] = 80.0  # an outlier row: its own scale, the other rows keep their precision
    probs = torch.rand(15)
    y8, _ = mod(x, tpe, probs)
    y, _ = plain(x, tpe, probs)
    # each quantized operand is off by <= 2^-4 relative, a dot product by <= ~2 * 2^-4 of the sum
    # of |terms|; two chained GEMMs stay within ~0.25 of |y|max.
    rel = ((y8 - y).abs().max() / y.abs().max()).item()
    assert torch.isfinite(y8).all() and 0 < rel < 0.25

    # one GEMM, fresh inputs: dgrad in FP8 equals the product of the dequantized operands (up to
    # float32 summation order), and is within FP8 error of the exact dgrad; wgrad is exact.
    w = torch.randn(E, 32, H, requires_grad=True)
    xi = torch.randn(15, H, requires_grad=True)
    offs = torch.cumsum(tpe, 0).to(torch.int32)
    g = torch.randn(15, 32)
    wq, wqt, ws = quantize_weight_reference(w)
    _FP8GroupedMM.apply(xi, w, wq, wqt, ws, offs, True).backward(g)
    gq, gs = quantize_rows_reference(g)
    g_deq, w_deq = gq.float() * gs[:, None], wq.float() * ws[:, None, None]
    starts = [0] + offs.tolist()[:-1]
    dx_deq = torch.cat([g_deq[s:e] @ w_deq[i] for i, (s, e) in enumerate(zip(starts, offs.tolist()))])
    assert torch.allclose(xi.grad, dx_deq, atol=1e-5)
    w2, x2 = w.detach().clone().requires_grad_(True), xi.detach().clone().requires_grad_(True)
    torch._grouped_mm(x2, w2.transpose(-2, -1), offs=offs).backward(g)
    assert ((xi.grad - x2.grad).abs().max() / x2.grad.abs().max()) < 0.15
    assert torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert w.grad[2].abs().max() == 0  # the idle expert


def test_weight_quantization_is_cached_until_the_weights_change(megatron_cpu):
    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP

    mod = _experts(megatron_cpu, True, cls=TorchFP8GroupedMLP, emulate=True)
    w = mod.linear_fc1.weight
    first = mod.quantized_weight(w)
    assert all(a is b for a, b in zip(first, mod.quantized_weight(w)))  # same step: reused

    w.grad = torch.randn_like(w)
    torch.optim.SGD(mod.parameters(), lr=0.5).step()  # any optimizer's step invalidates it
    after_step = mod.quantized_weight(w)
    assert after_step[0] is not first[0]
    deq = after_step[0].float() * after_step[2][:, None, None]
    assert ((deq - w.detach()).abs() <= w.detach().abs() * 2**-4 + after_step[2][:, None, None]).all()

    with torch.no_grad():
        w.mul_(2.0)  # an in-place change outside an optimizer (e.g. loading a checkpoint)
    assert torch.allclose(mod.quantized_weight(w)[2], after_step[2] * 2)


def test_fp8_without_an_fp8_gpu_names_the_fix(megatron_cpu):
    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP

    mod = _experts(megatron_cpu, True, cls=TorchFP8GroupedMLP)
    with pytest.raises(RuntimeError, match="drop --fp8-format"):
        mod(torch.randn(4, H), torch.tensor([4, 0, 0, 0]), torch.ones(4))
