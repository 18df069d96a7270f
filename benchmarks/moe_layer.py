"""MoE layer forward+backward on one GPU: stock Megatron experts vs the plugin's torch backends,
and the plugin's routers' cost.

    python benchmarks/moe_layer.py --json $OUT/moe_layer.json

For each shape (8192 tokens, EP=1, BF16 parameters) it builds Megatron's MoELayer (alltoall
dispatcher; permute and router fusion on where Transformer Engine is installed, Megatron's fused
weighted SwiGLU for the SwiGLU shapes) and times fwd+bwd
with CUDA events: warm-up, then the median of --iters steps, inputs rotating through a pool of
fresh random tensors. Rows:
  stock sequential     Megatron's SequentialMLP experts (the no-TE path)
  stock te bf16        Megatron's TEGroupedMLP (with TE only), and `stock te fp8 <recipe>` for
                       each FP8 recipe (hybrid format) the GPU runs
  stock te fp8 tensorwise +padding (stock / fixed)   the same with --moe-router-padding-for-
                       quantization, stock (crashes in backward) and with the plugin's fix
  torch bf16           the plugin's TorchGroupedMLP (torch._grouped_mm)
  torch fp8            TorchFP8GroupedMLP (FP8 forward and dgrad), weights quantized every step
                       as with one micro-batch per optimizer step
  torch fp8 cached w   the same with the weight quantization reused (what gradient accumulation
                       over several micro-batches approaches)
  router topk/c2r/locmoe   the router alone, fwd+bwd, same inputs (and `unfused` with TE)
  router .. kernel         the same with --moe-router-kernel fused (kernels/fused_router.py and the
                       tensor-core gating GEMM, kernels/router_gemm.py), and `, cuda graph`: its
                       forward+backward captured in a CUDA graph and replayed; `, megatron gating`:
                       the fused top-k with Megatron's FP32 gating GEMMs instead
  floor                the expert GEMMs alone: torch._grouped_mm BF16 fwd+bwd, rows split evenly
  torch bf16 device-splits [+router kernel] [, cuda graph]   the layer as the plugin runs it at
                       EP = 1 (mcore/device_splits.py: counts on the device, no host wait), with
                       Megatron's router or the fused kernel, eager or forward+backward captured in
                       one CUDA graph and replayed; `c2r ...` the same with C2R's router
`--rows GLOB...` measures only the rows whose label matches (the floor always). Columns also:
x floor, and with --kernels the kernel-time sum per step over the wall time (the
fraction of the step the GPU is busy).
Columns: ms, TFLOP/s of the expert GEMMs (6 x tokens x k x h x ffn x (3 for GLU else 2)), the
fraction of a BF16 8192^3 matmul's rate measured in the same run, and a breakdown: router,
experts module alone (on pre-permuted tokens), and the rest (permute, unpermute, aux loss).
Before timing, each plugin backend's output is compared with the stock layer's on the same weights.
"""

from __future__ import annotations

import argparse
import fnmatch
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


def have_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def fp8_recipes() -> list:
    """Megatron's FP8 recipes this GPU runs (mxfp8 needs Blackwell)."""
    major = torch.cuda.get_device_capability()[0]
    return ["delayed", "tensorwise", "blockwise"] + (["mxfp8"] if major >= 10 else [])


def config(shape, fp8_recipe=None, fused=None, padding=False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fused = have_te() if fused is None else fused
    fp8 = dict(fp8="hybrid", fp8_recipe=fp8_recipe) if fp8_recipe else {}
    return TransformerConfig(**fp8, moe_router_padding_for_quantization=padding,
        num_layers=1, hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"], moe_ffn_hidden_size=shape["ffn"],
        num_attention_heads=16, num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32", gated_linear_unit=shape["glu"],
        activation_func=torch.nn.functional.silu if shape["glu"] else torch.nn.functional.gelu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16, gradient_accumulation_fusion=False,
        bias_activation_fusion=shape["glu"], moe_permute_fusion=fused, moe_router_fusion=fused)


def build(shape, experts: str, router=None, fused=None, layer_cls=None):
    """experts: a row name of the table (see the module doc); layer_cls: MoELayer (default) or a
    plugin subclass."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_submodules,
        get_gpt_layer_with_transformer_engine_submodules,
    )
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import get_submodules

    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    recipe = experts.split()[3] if experts.startswith("stock te fp8") else None
    cfg = config(shape, fp8_recipe=recipe, fused=fused, padding="+padding" in experts)
    if experts.startswith("stock te"):
        subs = get_submodules(get_gpt_layer_with_transformer_engine_submodules(
            num_experts=shape["experts"], moe_grouped_gemm=True).mlp)
    else:
        subs = get_submodules(get_gpt_layer_local_submodules(num_experts=shape["experts"], moe_grouped_gemm=False).mlp)
    kw = {}
    if experts == "torch bf16":
        kw["experts"] = TorchGroupedMLP
    elif experts.startswith("torch fp8"):
        kw["experts"] = TorchFP8GroupedMLP
    if router is not None:
        kw["router"] = router
    layer = (layer_cls or MoELayer)(cfg, type(subs)(**{"experts": subs.experts, "router": subs.router, **kw})).cuda()
    layer.bench_ctx = fp8_context(cfg)
    layer.bench_new_step = experts == "torch fp8"  # requantize the weights every iteration
    return layer


def fp8_context(cfg):
    """Megatron's FP8 autocast for this config (a no-op context without FP8)."""
    from megatron.core.fp8_utils import get_fp8_context

    return lambda: get_fp8_context(cfg)


def copy_weights(src, dst) -> None:
    """SequentialMLP -> stacked (torch) or per-expert weight{i} (TEGroupedMLP), so that backends
    compute the same function."""
    with torch.no_grad():
        dst.router.weight.copy_(src.router.weight)
        for i, e in enumerate(src.experts.local_experts):
            for name in ("linear_fc1", "linear_fc2"):
                w = getattr(e, name).weight
                target = getattr(dst.experts, name)
                (getattr(target, f"weight{i}") if hasattr(target, f"weight{i}") else target.weight[i]).copy_(w)


def layer_step(layer, pool):
    from megatron_moe_ext.experts.fp8_grouped_mlp import new_optimizer_step

    def step(i):
        x, dy = pool[i % len(pool)]
        x = x.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)  # time the layer, not an accumulation into old grads
        if layer.bench_new_step:
            new_optimizer_step()
        with layer.bench_ctx():
            y, _ = layer(x)
        y.backward(dy)
    return step


def floor_step(shape, tokens: int):
    """The floor: the expert GEMMs alone, torch._grouped_mm BF16 forward and backward (dgrad and
    wgrad) of fc1 and fc2 with tokens x topk rows split evenly over the experts; fc2 reads its own
    input, so nothing but the six GEMMs runs."""
    e, k, h, f = shape["experts"], shape["topk"], shape["hidden"], shape["ffn"]
    rows = tokens * k
    fc1_out = 2 * f if shape["glu"] else f
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x1 = torch.randn(rows, h, **bf, requires_grad=True)
    x2 = torch.randn(rows, f, **bf, requires_grad=True)
    w1 = torch.randn(e, fc1_out, h, **bf, requires_grad=True)
    w2 = torch.randn(e, h, f, **bf, requires_grad=True)
    offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * (rows // e)
    offs[-1] = rows
    dy1, dy2 = torch.randn(rows, fc1_out, **bf), torch.randn(rows, h, **bf)

    def step(i):
        for t in (x1, x2, w1, w2):   # as layer_step's zero_grad: no accumulation into old gradients
            t.grad = None
        y1 = torch._grouped_mm(x1, w1.transpose(-2, -1), offs=offs)
        y2 = torch._grouped_mm(x2, w2.transpose(-2, -1), offs=offs)
        torch.autograd.backward((y1, y2), (dy1, dy2))
    return step


def graphed_step(module, pool, body):
    """`body(x, dy)` (a forward and backward of `module` returning its output) captured once in
    a CUDA graph with static input, output and gradient buffers, then replayed: each step copies
    the next input in and replays. Needs a module that reads nothing to the host (the
    device-splits dispatcher, a sync-free router). step.outputs: (output, the static input)."""
    x_static = pool[0][0].detach().clone().requires_grad_(True)
    dy_static = pool[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up off the capture stream, as torch.cuda.graphs advises
        for _ in range(3):
            module.zero_grad(set_to_none=True)
            body(x_static, dy_static)
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    x_static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):   # the gradients are allocated, and refilled on replay, in the graph
        y = body(x_static, dy_static)

    def step(i):
        x, dy = pool[i % len(pool)]
        x_static.data.copy_(x)
        dy_static.copy_(dy)
        graph.replay()
    step.outputs = (y, x_static)
    return step


def _layer_body(layer):
    def body(x, dy):
        y, _ = layer(x)
        y.backward(dy)
        return y
    return body


def _router_body(layer):
    def body(x, dy):
        probs, _ = layer.router(x)
        probs.sum().backward()
        return probs
    return body


def graphed_layer_step(layer, pool):
    """The layer's forward and backward in one CUDA graph (graphed_step)."""
    return graphed_step(layer, pool, _layer_body(layer))


def graphed_router_step(layer, pool):
    """The router's forward and backward alone in one CUDA graph, as router_step times it eagerly."""
    return graphed_step(layer, pool, _router_body(layer))


def experts_step(layer, pool):
    """The experts module alone on tokens permuted once, outside the timed region."""
    from megatron_moe_ext.experts.fp8_grouped_mlp import new_optimizer_step

    x0 = pool[0][0]
    with torch.no_grad(), layer.bench_ctx():
        probs, rmap = layer.router(x0)
        tok, p = layer.token_dispatcher.dispatch_preprocess(x0, rmap, probs)
        tok, p = layer.token_dispatcher.token_dispatch(tok, p)
        tok, tpe, p = layer.token_dispatcher.dispatch_postprocess(tok, p)
    dy = torch.randn_like(tok)

    def step(i):
        t = tok.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        if layer.bench_new_step:
            new_optimizer_step()
        with layer.bench_ctx():
            out, _ = layer.experts(t, tpe, p.detach())
        out.backward(dy)
    return step


def error_row(e: Exception, limit: int = 200) -> dict:
    """A table row that failed: the error goes into the table, the other rows still run."""
    return {"error": f"{type(e).__name__}: {str(e)[:limit]}"}


def graphed_router_row(layer, pool, args) -> dict:
    """{"router_ms": ...} of the router captured in a CUDA graph, or the error row."""
    try:
        return {"router_ms": median_ms(graphed_router_step(layer, pool), args.iters, args.warmup)}
    except Exception as e:
        return error_row(e)


def router_step(layer, pool):
    def step(i):
        x = pool[i % len(pool)][0].detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        probs, _ = layer.router(x)
        probs.sum().backward()
    return step


KERNEL_CLASSES = (  # first match wins (FP8 GEMMs' names mention e4m3); as the profiler names them
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "grouped_mm", "scaled_mm", "wgmma")),
    ("fp8 quantize", ("_rows_kernel", "_cast_transpose", "float8", "e4m3", "fp8_quant", "cast_transpose",
                      "quantize")),
    ("permute", ("permute", "unpermute", "sort", "scatter", "gather", "index", "nonzero", "masked",
                 "cumsum", "moe_")),
    ("activation", ("silu", "swiglu", "gelu", "sigmoid", "triton_", "_weighted_act_")),
    ("router", ("_router_fwd", "_router_bwd", "_kl_kernel")),   # the plugin's fused router kernels
)


def kernel_breakdown(step, steps: int = 5) -> dict:
    """GPU time per step by kernel class (torch.profiler), ms, plus the 15 largest kernels (names
    cut at 300 characters: torch's elementwise kernels differ only by the functor in their
    template arguments)."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    classes, kernels = {}, {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        name = evt.key.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in name for k in keys)), "other")
        classes[cls] = classes.get(cls, 0.0) + us / 1e3 / steps
        kernels[evt.key[:300]] = kernels.get(evt.key[:300], 0.0) + us / 1e3 / steps
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    return {"classes_ms": classes, "top_kernels_ms": top, "kernel_sum_ms": sum(classes.values())}


def check_against_reference(ref, layer, x) -> float:
    """Max |y - y_ref| / max |y_ref|, y_ref from the stock SequentialMLP layer (same weights, BF16;
    the float64 comparison of the backends is in tests/test_grouped_experts.py)."""
    with torch.no_grad():
        y_ref, _ = ref(x)
        with layer.bench_ctx():
            y, _ = layer(x)
    return ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()


# name -> (routing policy, fused router kernel, CUDA graph); every row: the torch BF16 experts
# in DeviceSplitsMoELayer (mcore/device_splits.py: the counts stay on the device at EP = 1)
PLUGIN_LAYERS = {
    "torch bf16 device-splits": ("topk", False, False),
    "torch bf16 device-splits +router kernel": ("topk", True, False),
    "torch bf16 device-splits, cuda graph": ("topk", False, True),
    "torch bf16 device-splits +router kernel, cuda graph": ("topk", True, True),
    "c2r torch bf16 device-splits +router kernel": ("c2r", True, False),
    "c2r torch bf16 device-splits +router kernel, cuda graph": ("c2r", True, True),
}


def wanted(args, label: str) -> bool:
    """Whether --rows selects the row `label` (no --rows: every row)."""
    return not args.rows or any(fnmatch.fnmatchcase(label, pat) for pat in args.rows)


def plugin_layer_rows(shape, stock, pool, args) -> dict:
    """The layer as the plugin runs it at EP = 1, eager and captured in a CUDA graph. A graph row
    also records how far its replayed output is from the eager layer's on the same input."""
    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer
    from megatron_moe_ext.mcore.router import C2RRouter, TopKPolicyRouter

    rows = {}
    for label, (policy, kernel, graphed) in PLUGIN_LAYERS.items():
        if not wanted(args, label):
            continue
        row = {}
        try:
            router = None
            if policy != "topk" or kernel:
                cls = C2RRouter if policy == "c2r" else TopKPolicyRouter
                router = functools.partial(cls, ext_cfg=MoEExtConfig(
                    router_policy=policy, router_kernel="fused" if kernel else "megatron"))
            layer = build(shape, "torch bf16", router=router, fused=False, layer_cls=DeviceSplitsMoELayer)
            copy_weights(stock, layer)
            row["rel_err_vs_stock"] = check_against_reference(stock, layer, pool[0][0])
            if graphed:
                step = graphed_layer_step(layer, pool)
                step(0)
                torch.cuda.synchronize()
                y_graph = step.outputs[0].detach().clone()
                with torch.no_grad():
                    y_eager, _ = layer(pool[0][0])
                row["graph_vs_eager"] = ((y_graph.float() - y_eager.float()).abs().max()
                                         / y_eager.float().abs().max()).item()
            else:
                step = layer_step(layer, pool)
            row["ms"] = median_ms(step, args.iters, args.warmup)
            if args.kernels:
                row["kernels"] = kernel_breakdown(step)
        except Exception as e:  # keep the other rows; the error goes into the table
            row.update(error_row(e, 300))
        rows[label] = row
        layer = step = None
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", required=True)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--kernels", action="store_true", help="also profile each row's kernels by class")
    p.add_argument("--rows", nargs="*", default=None, metavar="GLOB",
                   help="measure only the rows whose label matches one of these fnmatch patterns (the "
                        "floor always), e.g. 'stock te*' '*device-splits +router kernel, cuda graph'")
    args = p.parse_args()

    init_single_gpu_megatron(port=29513)
    from megatron_moe_ext.compat.megatron_0_19 import patch_named
    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.router import C2RRouter, LocMoERouter, TopKPolicyRouter

    padding_fix = patch_named("router-padding-out-of-place")

    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: BF16 8192^3 matmul {peak:.0f} TFLOP/s")
    results = {"device": torch.cuda.get_device_name(), "matmul_peak_tflops": peak, "shapes": {},
               "transformer_engine": have_te(), "torch": torch.__version__}
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
        backends = ["stock sequential"]
        if have_te():
            backends += ["stock te bf16"] + [f"stock te fp8 {r}" for r in fp8_recipes()]
            backends += ["stock te fp8 tensorwise +padding (stock)", "stock te fp8 tensorwise +padding (fixed)"]
        backends += ["torch bf16", "torch fp8", "torch fp8 cached w"]
        for backend in filter(functools.partial(wanted, args), backends):
            row = {}
            try:
                if backend.endswith("(fixed)"):
                    padding_fix.apply()
                layer = stock if backend == "stock sequential" else build(shape, backend)
                if layer is not stock:
                    copy_weights(stock, layer)
                    row["rel_err_vs_stock"] = check_against_reference(stock, layer, pool[0][0])
                row["ms"] = median_ms(layer_step(layer, pool), args.iters, args.warmup)
                row["experts_ms"] = median_ms(experts_step(layer, pool), args.iters, args.warmup)
                row["router_ms"] = median_ms(router_step(layer, pool), args.iters, args.warmup)
                row["rest_ms"] = row["ms"] - row["experts_ms"] - row["router_ms"]
                if args.kernels:
                    row["kernels"] = kernel_breakdown(layer_step(layer, pool))
            except Exception as e:  # keep the other rows; the error goes into the table
                row.update(error_row(e, 300))
            finally:
                if backend.endswith("(fixed)"):
                    padding_fix.revert()
            rows[backend] = row
            layer = None
            torch.cuda.empty_cache()
        for fused in ([True, False] if have_te() else [False]):
            for policy, cls in (("topk", None), ("c2r", C2RRouter), ("locmoe", LocMoERouter)):
                router = None if cls is None else functools.partial(cls, ext_cfg=MoEExtConfig(router_policy=policy))
                label = f"router {policy}" + ("" if fused or not have_te() else " unfused")
                if not wanted(args, label):
                    continue
                try:
                    layer = build(shape, "torch bf16", router=router, fused=fused)
                    rows[label] = {"router_ms": median_ms(router_step(layer, pool), args.iters, args.warmup)}
                    if args.kernels:
                        rows[label]["kernels"] = kernel_breakdown(router_step(layer, pool))
                    del layer
                except Exception as e:
                    rows[label] = error_row(e)
        # the plugin's fused selection kernel (--moe-router-kernel fused), TE's fusion off
        for policy, cls in (("topk", TopKPolicyRouter), ("c2r", C2RRouter), ("locmoe", LocMoERouter)):
            label = f"router {policy} kernel"
            tails = [t for t in ("", ", cuda graph") + ((", megatron gating, cuda graph",) if policy == "topk" else ())
                     if wanted(args, label + t)]
            if not tails:
                continue
            try:
                router = functools.partial(cls, ext_cfg=MoEExtConfig(router_policy=policy, router_kernel="fused"))
                layer = build(shape, "torch bf16", router=router, fused=False)
                if "" in tails:
                    rows[label] = {"router_ms": median_ms(router_step(layer, pool), args.iters, args.warmup)}
                    if args.kernels:
                        rows[label]["kernels"] = kernel_breakdown(router_step(layer, pool))
                if ", cuda graph" in tails:   # captured: what is left once launches cost nothing
                    rows[label + ", cuda graph"] = graphed_router_row(layer, pool, args)
                if ", megatron gating, cuda graph" in tails:   # with Megatron's FP32 gating GEMMs instead
                    from megatron.core.transformer.moe.router import TopKRouter

                    layer.router.gating = functools.partial(TopKRouter.gating, layer.router)
                    rows[label + ", megatron gating, cuda graph"] = graphed_router_row(layer, pool, args)
                del layer
            except Exception as e:
                rows[label] = error_row(e)
        rows["floor"] = {"ms": median_ms(floor_step(shape, args.tokens), args.iters, args.warmup)}
        rows.update(plugin_layer_rows(shape, stock, pool, args))
        for v in rows.values():
            if "ms" in v:
                v["tflops"] = flops / v["ms"] / 1e9
                v["peak_fraction"] = v["tflops"] / peak
                v["x_floor"] = v["ms"] / rows["floor"]["ms"]
            if "kernels" in v:   # the fraction of the step the GPU is busy (kernel-time sum / wall)
                v["gpu_busy"] = v["kernels"]["kernel_sum_ms"] / v.get("ms", v.get("router_ms"))
        results["shapes"][name] = rows
        with open(args.json, "w") as fh:   # after every shape: a cut-off run keeps what it measured
            json.dump(results, fh, indent=1)
        del stock
        torch.cuda.empty_cache()
        print(f"\n{name}, {args.tokens} tokens, fwd+bwd, median of {args.iters}")
        print(f"{'row':<52}{'ms':>8}{'x floor':>8}{'TFLOP/s':>8}{'peak':>7}{'router':>8}{'experts':>8}"
              f"{'rest':>7}{'busy':>6}{'err':>9}")
        for r, v in rows.items():
            if "error" in v:
                print(f"{r:<52} {v['error']}")
                continue
            cell = lambda key, fmt, w: (format(v[key], fmt) if v.get(key) is not None else "").rjust(w)  # noqa: E731
            print(f"{r:<52}{cell('ms', '.2f', 8)}{cell('x_floor', '.2f', 8)}{cell('tflops', '.0f', 8)}"
                  f"{cell('peak_fraction', '.1%', 7)}{cell('router_ms', '.2f', 8)}{cell('experts_ms', '.2f', 8)}"
                  f"{cell('rest_ms', '.2f', 7)}{cell('gpu_busy', '.0%', 6)}{cell('rel_err_vs_stock', '.1e', 9)}")
        if args.kernels:
            print("GPU kernel time per step by class (ms):")
            for r, v in rows.items():
                if "kernels" in v:
                    print(f"  {r:<40}" + "  ".join(f"{c} {t:.2f}" for c, t in sorted(v["kernels"]["classes_ms"].items())))


if __name__ == "__main__":
    main()
