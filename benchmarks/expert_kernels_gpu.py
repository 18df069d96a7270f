"""The torch expert backend's own kernels on the GPU (FP8 quantizers, FP8 grouped GEMM, weighted
SwiGLU): checks, then timings.

    cd benchmarks; python expert_kernels_gpu.py --json $OUT/expert_kernels.json

Checks (fresh random inputs; exits non-zero if one fails):
  - the Triton quantizers equal the plain-torch references bit for bit (same float32 product,
    same saturation, the GPU's round-to-nearest cast), rows and weights (q and its transpose);
  - the FP8 grouped GEMM (torch._scaled_grouped_mm) forward and dgrad equal the float32
    emulation of the same quantized operands to 1e-2 of the output's max (the kernel accumulates
    in float32 in another order and rounds its output to BF16: 2^-8 relative).
  - the weighted SwiGLU kernels (forward, d_fc1, d_probs) against float64 autograd: float32
    inputs within 1e-5 of the max; bf16 inputs within 1e-2 (one bf16 rounding of each output).
Timings (CUDA events, median): each quantizer fused vs eager, the SwiGLU kernels vs Megatron's
weighted_bias_swiglu_impl, on the MoE benchmark's shapes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from gpu_setup import median_ms


def check(name: str, ok: bool, detail: str, results: dict) -> None:
    results["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"{'ok ' if ok else 'FAIL'} {name}: {detail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    from megatron_moe_ext.experts import fp8_quant as fq
    from megatron_moe_ext.experts.fp8_grouped_mlp import _FP8GroupedMM

    torch.manual_seed(0)
    dev = "cuda"
    results = {"device": torch.cuda.get_device_name(), "checks": {}, "timings_ms": {}}
    for shape in [(16384, 2048), (300, 14336), (5, 48)]:
        x = torch.randn(*shape, device=dev, dtype=torch.bfloat16) * 3
        x[0, 1] = 900.0
        q, s = fq.quantize_rows(x)
        qr, sr = fq.quantize_rows_reference(x)
        same = torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
        check(f"rows {shape}", same, f"{(q.float() != qr.float()).sum().item()} differing elements", results)
    w = torch.randn(8, 200, 300, device=dev, dtype=torch.bfloat16)
    q, qt, s = fq.quantize_weight(w)
    qr, qtr, sr = fq.quantize_weight_reference(w)
    same = torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(qt.view(torch.uint8), qtr.view(torch.uint8))
    check("weight (8, 200, 300)", same and torch.equal(s, sr), "q, qt and scales", results)

    # the FP8 GEMM against its emulation, forward and dgrad
    tpe = torch.tensor([700, 0, 1300, 48, 2000, 1, 900, 1144], device=dev)
    offs = torch.cumsum(tpe, 0).to(torch.int32)
    x = torch.randn(int(tpe.sum()), 1024, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(8, 512, 1024, device=dev) * 0.02).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(x.shape[0], 512, device=dev, dtype=torch.bfloat16)
    outs = []
    for emulate in (False, True):
        xi = x.clone().requires_grad_(True)
        wq, wqt, ws = fq.quantize_weight(w)
        y = _FP8GroupedMM.apply(xi, w, wq, wqt, ws, offs, emulate)
        y.backward(g)
        outs.append((y.float(), xi.grad.float()))
    for i, name in enumerate(("forward", "dgrad")):
        rel = ((outs[0][i] - outs[1][i]).abs().max() / outs[1][i].abs().max()).item()
        check(f"scaled_grouped_mm {name} vs emulation", rel < 1e-2, f"rel err {rel:.2e}", results)

    from megatron_moe_ext.experts.swiglu import weighted_swiglu

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = (torch.randn(3000, 2 * 1408, device=dev) * 2).to(dtype).requires_grad_(True)
        pr = torch.rand(3000, device=dev, requires_grad=True)
        dy = torch.randn(3000, 1408, device=dev).to(dtype)
        y = weighted_swiglu(x, pr)
        y.backward(dy)
        xr, prr = x.detach().double().requires_grad_(True), pr.detach().double().requires_grad_(True)
        g_, u_ = xr.chunk(2, dim=-1)
        yr = torch.nn.functional.silu(g_) * u_ * prr.unsqueeze(-1)
        yr.backward(dy.double())
        rels = [((a.double() - b).abs().max() / b.abs().max()).item()
                for a, b in ((y, yr), (x.grad, xr.grad), (pr.grad, prr.grad))]
        check(f"weighted swiglu {dtype}", max(rels) < tol, "rel err out/d_fc1/d_probs " +
              "/".join(f"{r:.1e}" for r in rels), results)

    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

    for t_rows, f in ((16384, 14336), (65536, 768)):
        x = torch.randn(t_rows, 2 * f, device=dev, dtype=torch.bfloat16, requires_grad=True)
        pr = torch.rand(t_rows, device=dev, requires_grad=True)
        dy = torch.randn(t_rows, f, device=dev, dtype=torch.bfloat16)
        for label, fn in (("triton", lambda: weighted_swiglu(x, pr)),
                          ("megatron", lambda: weighted_bias_swiglu_impl(x, None, pr.unsqueeze(-1)))):
            results["timings_ms"][f"swiglu fwd+bwd {t_rows}x{f} {label}"] = median_ms(
                lambda i: fn().backward(dy), 10, 3)

    shapes = {"act 65536x2048": (65536, 2048), "act 16384x14336": (16384, 14336)}
    for label, shape in shapes.items():
        t = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        results["timings_ms"][f"rows {label} fused"] = median_ms(lambda i: fq.quantize_rows(t), 20, 3)
        results["timings_ms"][f"rows {label} eager"] = median_ms(lambda i: fq.quantize_rows_reference(t), 20, 3)
    for label, shape in {"w 8x28672x4096": (8, 28672, 4096), "w 128x1536x2048": (128, 1536, 2048)}.items():
        t = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        results["timings_ms"][f"weight {label} fused"] = median_ms(lambda i: fq.quantize_weight(t), 10, 2)
        results["timings_ms"][f"weight {label} eager"] = median_ms(lambda i: fq.quantize_weight_reference(t), 10, 2)
    for k, v in results["timings_ms"].items():
        print(f"{k:<40}{v:>9.3f} ms")
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)
    sys.exit(0 if all(c["ok"] for c in results["checks"].values()) else 1)


if __name__ == "__main__":
    main()
