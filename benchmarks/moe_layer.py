"""MoE layer forward+backward on one GPU: stock Megatron experts vs the plugin's torch backends,
and the plugin's routers' cost.

    python benchmarks/moe_layer.py --json $OUT/moe_layer.json

For each shape (8192 tokens, EP=1, BF16 parameters) it builds Megatron's MoELayer (alltoall
dispatcher) and times fwd+bwd with CUDA events: warm-up, then the median of --iters steps, inputs
rotating through a pool of fresh random tensors. Rows:
  stock sequential     Megatron's SequentialMLP experts (the no-TE path; TEGroupedMLP needs TE)
  torch bf16           the plugin's TorchGroupedMLP (torch._grouped_mm)
  torch fp8            TorchFP8GroupedMLP (FP8 forward GEMMs, BF16 backward)
  router topk/c2r/locmoe   the router alone, fwd+bwd, same inputs
Columns: ms, TFLOP/s of the expert GEMMs (6 x tokens x k x h x ffn x (3 for GLU else 2)), the
fraction of a BF16 8192^3 matmul's rate measured in the same run, and a breakdown: router,
experts module alone (on pre-permuted tokens), and the rest (permute, unpermute, aux loss).
Before timing, each plugin backend's output is compared with the stock layer's on the same weights.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from gpu_setup import init_single_gpu_megatron, median_ms

SHAPES = {
    "h2048 ffn1408 16E top-2 gelu": dict(hidden=2048, ffn=1408, experts=16, topk=2, glu=False),
    "qwen3-30b-a3b-like h2048 ffn768 128E top-8 swiglu": dict(hidden=2048, ffn=768, experts=128, topk=8, glu=True),
    "mixtral-like h4096 ffn14336 8E top-2 swiglu": dict(hidden=4096, ffn=14336, experts=8, topk=2, glu=True),
}


def matmul_peak_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda i: a @ b, 20, 5)
    return 2 * n**3 / ms / 1e9


def config(shape, fp8: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"], moe_ffn_hidden_size=shape["ffn"],
        num_attention_heads=16, num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32", gated_linear_unit=shape["glu"],
        activation_func=torch.nn.functional.silu if shape["glu"] else torch.nn.functional.gelu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, moe_permute_fusion=False, moe_router_fusion=False)


def build(shape, experts: str, router=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import get_submodules

    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cfg = config(shape)
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=shape["experts"], moe_grouped_gemm=False).mlp)
    kw = {}
    if experts == "torch bf16":
        kw["experts"] = TorchGroupedMLP
    elif experts == "torch fp8":
        kw["experts"] = TorchFP8GroupedMLP
    if router is not None:
        kw["router"] = router
    return MoELayer(cfg, type(subs)(**{"experts": subs.experts, "router": subs.router, **kw})).cuda()


def copy_weights(src, dst) -> None:
    """SequentialMLP -> stacked, so that backends compute the same function."""
    with torch.no_grad():
        dst.router.weight.copy_(src.router.weight)
        for i, e in enumerate(src.experts.local_experts):
            dst.experts.linear_fc1.weight[i].copy_(e.linear_fc1.weight)
            dst.experts.linear_fc2.weight[i].copy_(e.linear_fc2.weight)


def layer_step(layer, pool):
    def step(i):
        x, dy = pool[i % len(pool)]
        x = x.detach().requires_grad_(True)
        y, _ = layer(x)
        y.backward(dy)
    return step


def experts_step(layer, pool):
    """The experts module alone on tokens permuted once, outside the timed region."""
    x0 = pool[0][0]
    with torch.no_grad():
        probs, rmap = layer.router(x0)
        tok, p = layer.token_dispatcher.dispatch_preprocess(x0, rmap, probs)
        tok, p = layer.token_dispatcher.token_dispatch(tok, p)
        tok, tpe, p = layer.token_dispatcher.dispatch_postprocess(tok, p)
    dy = torch.randn_like(tok)

    def step(i):
        t = tok.detach().requires_grad_(True)
        out, _ = layer.experts(t, tpe, p.detach())
        out.backward(dy)
    return step


def router_step(layer, pool):
    def step(i):
        x = pool[i % len(pool)][0].detach().requires_grad_(True)
        probs, _ = layer.router(x)
        probs.sum().backward()
    return step


def check_against_reference(ref, layer, x) -> float:
    """Max |y - y_ref| / max |y_ref|, y_ref from the stock SequentialMLP layer (same weights, BF16;
    the float64 comparison of the backends is in tests/test_grouped_experts.py)."""
    with torch.no_grad():
        y_ref, _ = ref(x)
        y, _ = layer(x)
    return ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", required=True)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = p.parse_args()

    init_single_gpu_megatron(port=29513)
    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.megatron.router import C2RRouter, LocMoERouter

    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: BF16 8192^3 matmul {peak:.0f} TFLOP/s")
    results = {"device": torch.cuda.get_device_name(), "matmul_peak_tflops": peak, "shapes": {}}
    for name in args.shapes:
        shape = SHAPES[name]
        h, f, k = shape["hidden"], shape["ffn"], shape["topk"]
        flops = 6 * args.tokens * k * h * f * (3 if shape["glu"] else 2)
        g = torch.Generator(device="cuda").manual_seed(0)
        pool = [(torch.randn(args.tokens, 1, h, device="cuda", dtype=torch.bfloat16, generator=g),
                 torch.randn(args.tokens, 1, h, device="cuda", dtype=torch.bfloat16, generator=g))
                for _ in range(3)]
        rows = {}
        stock = build(shape, "stock sequential")
        for backend in ("stock sequential", "torch bf16", "torch fp8"):
            layer = stock if backend == "stock sequential" else build(shape, backend)
            row = {}
            try:
                if layer is not stock:
                    copy_weights(stock, layer)
                    row["rel_err_vs_stock"] = check_against_reference(stock, layer, pool[0][0])
                row["ms"] = median_ms(layer_step(layer, pool), args.iters, args.warmup)
                row["experts_ms"] = median_ms(experts_step(layer, pool), args.iters, args.warmup)
                row["router_ms"] = median_ms(router_step(layer, pool), args.iters, args.warmup)
                row["rest_ms"] = row["ms"] - row["experts_ms"] - row["router_ms"]
                row["tflops"] = flops / row["ms"] / 1e9
                row["peak_fraction"] = row["tflops"] / peak
            except Exception as e:  # keep the other rows; the error goes into the table
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows[backend] = row
            if layer is not stock:
                del layer
            torch.cuda.empty_cache()
        for policy, cls in (("topk", None), ("c2r", C2RRouter), ("locmoe", LocMoERouter)):
            router = None if cls is None else functools.partial(cls, ext_cfg=MoEExtConfig(router_policy=policy))
            try:
                layer = build(shape, "torch bf16", router=router)
                rows[f"router {policy}"] = {"router_ms": median_ms(router_step(layer, pool), args.iters, args.warmup)}
                del layer
            except Exception as e:
                rows[f"router {policy}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        results["shapes"][name] = rows
        del stock
        torch.cuda.empty_cache()
        print(f"\n{name}, {args.tokens} tokens, fwd+bwd, median of {args.iters}")
        print(f"{'row':<18}{'ms':>9}{'TFLOP/s':>9}{'peak':>7}{'router':>8}{'experts':>9}{'rest':>8}{'err':>9}")
        for r, v in rows.items():
            if "error" in v:
                print(f"{r:<18} {v['error']}")
            elif "ms" in v:
                print(f"{r:<18}{v['ms']:>9.2f}{v['tflops']:>9.0f}{v['peak_fraction']:>7.1%}{v['router_ms']:>8.2f}"
                      f"{v['experts_ms']:>9.2f}{v['rest_ms']:>8.2f}{v.get('rel_err_vs_stock', 0):>9.1e}")
            else:
                print(f"{r:<18}{'':>9}{'':>9}{'':>7}{v['router_ms']:>8.2f}")
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
