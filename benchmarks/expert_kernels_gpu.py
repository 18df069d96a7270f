"""Timings of the torch expert backend's own GPU kernels (FP8 quantizers, weighted SwiGLU)
against their eager forms, on the MoE benchmark's shapes.

    cd benchmarks; python expert_kernels_gpu.py --json $OUT/expert_kernels.json

CUDA events, median: each quantizer fused vs eager, the SwiGLU kernels fwd+bwd vs Megatron's
weighted_bias_swiglu_impl. Their correctness (the kernels against their references, with
tolerances) is checked by `pytest -m gpu tests/test_gpu_kernels.py` (benchmarks/run_gpu_tests.sh).
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_setup import median_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

    from megatron_moe_ext.experts import fp8_quant as fq
    from megatron_moe_ext.experts.weighted_activation import weighted_swiglu

    torch.manual_seed(0)
    dev = "cuda"
    results = {"device": torch.cuda.get_device_name(), "timings_ms": {}}
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


if __name__ == "__main__":
    main()
