"""`megatron-moe-ext import-hf`: a HuggingFace MoE folder as a Megatron torch_dist checkpoint.

Reads config.json and the weights (safetensors, per-expert or fused experts; a .bin only through
torch.load(weights_only=True); nothing from the folder is executed) of a Qwen3-MoE, Qwen2-MoE or
Mixtral model, and writes OUT (a release checkpoint: train on with `--load OUT --finetune`) and
OUT/megatron_flags.txt, the Megatron model flags that compute the same model. The checkpoint
loads under any TP/PP/EP (Megatron reshards torch_dist on load); the parallel sizes given here
are checked against the model and written into megatron_flags.txt. Runs on one CPU process.
Library: `convert/hf/import_hf.py`.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-hf",
        help="Import a HuggingFace MoE model folder as a Megatron checkpoint.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf", required=True, help="HF model folder (config.json + weights)")
    p.add_argument(
        "--out", required=True, help="Megatron checkpoint folder to write (new or empty, or --overwrite)"
    )
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.errors import UserError

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(ns, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
    from megatron_moe_ext.convert.hf.import_hf import FLAGS_FILE, import_hf

    s = import_hf(
        ns.hf,
        ns.out,
        tp=ns.tensor_model_parallel_size,
        pp=ns.pipeline_model_parallel_size,
        ep=ns.expert_model_parallel_size,
        overwrite=ns.overwrite,
    )
    print(
        f"imported {ns.hf} ({s['architecture']}, {s['layers']} layers, {s['experts']} experts, "
        f"{s['parameters']:,} parameters) -> {s['out']}\nMegatron flags ({s['out']}/{FLAGS_FILE}):\n"
        f"{s['flags']}\ntrain on with: --load {s['out']} --finetune <those flags> <data and schedule flags>"
    )
    return 0
