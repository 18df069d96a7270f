"""ScMoE pair (dense block l + MoE block l+1) on one GPU: overlapped schedule vs sequential.

    python benchmarks/scmoe_layer.py --json $OUT/scmoe.json --trace-dir $OUT

Builds a real Megatron TransformerBlock of two layers with the plugin's pos2 spec (local
implementation: no TE needed), BF16, EP=1, and times forward+backward with CUDA events after a
warm-up (median of --iters steps, fresh random inputs each step from a pool of 4):
  sequential     the ScMoE layer with every step on the current stream
  overlap slot K the side-stream schedule with the expert GEMMs at slot K (1-4)
  shared-expert  stock Megatron layers of the same shapes (top-1 + gated shared expert, no shortcut)
With EP=1 there is no all-to-all to hide (Megatron skips it for one rank), so this measures what
the schedule costs: stream switches, events and the lost kernel ordering. A profiler trace of the
overlapped schedule is summarised per CUDA stream (kernel names and time) and saved.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
from collections import defaultdict

import torch
from gpu_setup import init_single_gpu_megatron, median_ms


def build(args, mode: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.scmoe_spec import apply_scmoe

    cfg = TransformerConfig(
        num_layers=2, moe_layer_freq=[0, 1], hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads, num_moe_experts=args.experts, moe_router_topk=1,
        moe_router_pre_softmax=True, moe_ffn_hidden_size=args.ffn,
        moe_shared_expert_intermediate_size=args.ffn, moe_shared_expert_gate=True,
        moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32", moe_aux_loss_coeff=1e-2,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        normalization="RMSNorm", bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0,
        attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, bias_activation_fusion=False,
        moe_permute_fusion=False, moe_router_fusion=False)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    if mode != "stock":
        spec = apply_scmoe(spec, MoEExtConfig(scmoe="pos2"), cfg, layer_offset=0)
    return TransformerBlock(cfg, spec).cuda()


def time_steps(block, args, pool) -> float:
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device="cuda"), 1)[None, None]

    def step(i):
        x, dy = pool[i % len(pool)]
        block(hidden_states=x.detach().requires_grad_(True), attention_mask=mask).backward(dy)

    return median_ms(step, args.iters, args.warmup)


def set_slot(block, slot, overlap: bool) -> None:
    from megatron_moe_ext.mcore.scmoe_layer import ScMoELayer

    for layer in block.layers:
        if isinstance(layer, ScMoELayer):
            layer.overlap_comm = overlap
            layer.slot_chooser.frozen = slot


def trace_summary(block, args, pool, path: str) -> dict:
    """Kernels per CUDA stream in two overlapped steps: {stream: {kernel: total us}}."""
    from torch.profiler import ProfilerActivity, profile

    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device="cuda"), 1)[None, None]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for x, dy in pool[:2]:
            x = x.detach().requires_grad_(True)
            block(hidden_states=x, attention_mask=mask).backward(dy)
        torch.cuda.synchronize()
    raw = path + ".json"
    prof.export_chrome_trace(raw)
    with open(raw) as f:
        events = json.load(f)["traceEvents"]
    with gzip.open(path + ".json.gz", "wt") as f:
        json.dump(events, f)
    os.remove(raw)
    per_stream = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "args" in e:
            per_stream[str(e["args"].get("stream"))][e["name"][:70]] += e.get("dur", 0.0)
    return {s: dict(sorted(k.items(), key=lambda kv: -kv[1])[:8]) for s, k in per_stream.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--json", required=True)
    p.add_argument("--trace-dir", default=None)
    args = p.parse_args()

    init_single_gpu_megatron(port=29512)

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.seq, args.batch, args.hidden)
    pool = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g),
             torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)) for _ in range(4)]

    rows = {}
    block = build(args, "scmoe")
    set_slot(block, 4, overlap=False)
    rows["sequential"] = time_steps(block, args, pool)
    for slot in (1, 2, 3, 4):
        set_slot(block, slot, overlap=True)
        rows[f"overlap slot {slot}"] = time_steps(block, args, pool)
    set_slot(block, 4, overlap=False)  # again at the end: drift (clocks, allocator) shows up here
    rows["sequential (again)"] = time_steps(block, args, pool)
    summary = None
    if args.trace_dir:
        set_slot(block, 2, overlap=True)
        summary = trace_summary(block, args, pool, os.path.join(args.trace_dir, "scmoe_trace"))
    del block
    stock = build(args, "stock")
    rows["stock shared-expert (no shortcut)"] = time_steps(stock, args, pool)

    seq = statistics.median([rows["sequential"], rows["sequential (again)"]])
    best = min(v for k, v in rows.items() if k.startswith("overlap"))
    print(f"\nScMoE pos2 pair fwd+bwd, {torch.cuda.get_device_name()}, tokens {args.seq * args.batch}, "
          f"h{args.hidden} ffn{args.ffn} {args.experts}E top-1 + shared, BF16, EP=1, median of {args.iters}")
    print(f"{'schedule':<36}{'ms':>9}{'vs sequential':>15}")
    for k, v in rows.items():
        print(f"{k:<36}{v:>9.3f}{(v / seq - 1) * 100:>+14.1f}%")
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "median_ms": rows,
              "sequential_ms": seq, "best_overlap_ms": best,
              "best_overlap_vs_sequential": best / seq - 1, "streams": summary}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if summary:
        print("\nkernels per CUDA stream (overlap slot 2, two steps; top 8 by time, us):")
        for s, kernels in summary.items():
            print(f"  stream {s}: " + "; ".join(f"{k} {v:.0f}" for k, v in list(kernels.items())[:5]))


if __name__ == "__main__":
    main()
