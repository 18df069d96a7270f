"""`megatron-moe-ext export-hf`: a Megatron torch_dist checkpoint as a HuggingFace model folder.

Writes config.json, generation_config.json and safetensors weights in the per-expert layout
(sharded with model.safetensors.index.json above --max-shard-size), for Qwen3-MoE (q/k
layernorm), Qwen2-MoE (gated shared expert) or Mixtral, chosen from the run's saved args; the
SentencePiece tokenizer of the run goes along when it is found. Any TP/PP/EP layout reads the
same (torch_dist stores global tensors); the export streams one layer at a time. Settings that
no HF architecture computes are refused with the reason (docs/hf.md). The output appears only
when complete. Library: `convert/hf/export.py`.
"""

from __future__ import annotations

import argparse
import json


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-hf",
        help="Export a Megatron MoE checkpoint as a HuggingFace model folder.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--load",
        required=True,
        help="checkpoint folder (latest_checkpointed_iteration.txt) or one iter_XXXXXXX folder",
    )
    p.add_argument("--out", required=True, help="HF folder to write (new or empty, or --overwrite)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="weights dtype (default: bf16 if the run trained in bf16, else fp32)",
    )
    p.add_argument(
        "--routing",
        choices=["native", "topk"],
        default="native",
        help="native: refuse plugin routing policies; topk: export their weights with plain "
        "top-k routing (the HF model then routes differently from training)",
    )
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default="5GB",
        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB; shards are written as "
        "tensors arrive, not buffered)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.convert.hf.export import export_hf

    s = export_hf(
        ns.load,
        ns.out,
        iteration=ns.iteration,
        dtype=ns.dtype,
        routing=ns.routing,
        overwrite=ns.overwrite,
        max_shard_bytes=ns.max_shard_size,
    )
    if ns.json:
        print(json.dumps(s, indent=1))
    else:
        print(
            f"exported {s['source']} -> {s['out']}: {s['architecture']}, {s['layers']} layers, "
            f"{s['experts']} experts, {s['parameters']:,} parameters "
            f"({s['bytes'] / 1e6:.1f} MB {s['dtype']}) "
            f"in {s['shards']} shard(s); routing {s['routing']}; tokenizer: {s['tokenizer'] or 'none'}"
        )
    return 0
