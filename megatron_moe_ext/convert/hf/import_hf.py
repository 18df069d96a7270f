"""HuggingFace folder -> Megatron torch_dist checkpoint the plugin's pretrain entry loads
(`--load OUT` to continue as a release checkpoint, or `--load OUT --finetune`), plus
`OUT/megatron_flags.txt`, one line of the Megatron model flags that computes the same model.

Route: build Megatron's own GPTModel (TP=PP=EP=1) on one CPU gloo rank from those flags, copy
the HF tensors into its parameters through Megatron's sharded state dict (each ShardedTensor
names its global key and offset, so the copy needs no knowledge of the module tree or expert
backend), and save with Megatron's dist checkpointing. Keys, `_extra_state` objects, sharding
metadata and saved `args` are then exactly Megatron's, and because torch_dist stores global
tensors, Megatron reshards the checkpoint on load to whatever TP/PP/EP the training run uses; the
parallel sizes given here only go into megatron_flags.txt (after checking they divide the model).
Memory: the Megatron model (float32) plus one layer of HF tensors.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict

import torch

from megatron_moe_ext.convert.hf.arch import arch_from_hf_config, dims_from_hf, megatron_flags_from_hf
from megatron_moe_ext.convert.hf.hf_reader import HFWeights, read_config
from megatron_moe_ext.convert.hf.mapping import GLOBAL_TO_HF, expected_hf_shapes, layer_from_hf
from megatron_moe_ext.convert.hf.outdir import check_output, staged_output

FLAGS_FILE = "megatron_flags.txt"
_LAYER = "decoder.layers."


def _layer_of(sh):
    """(layer or -1, key without the layer part, whether axis 0 is the layer axis).

    Megatron stacks layers into `decoder.layers.<key>` [layers, ...] when all layers are alike,
    and keys them `decoder.layers.<i>.<key>` when they are not (--moe-layer-freq patterns)."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", sh.key)
    if m:
        return int(m.group(1)), m.group(2), False
    if sh.key.startswith(_LAYER):
        return sh.global_offset[0], sh.key[len(_LAYER) :], True
    return -1, sh.key, False


def prepare_import(hf: str, *, tp: int = 1, pp: int = 1, ep: int = 1):
    """Every check that needs no Megatron: (config, arch, dims, flags, weights)."""
    hf_dir = Path(hf)
    cfg = read_config(hf_dir)
    cfg_path = str(hf_dir / "config.json")
    arch = arch_from_hf_config(cfg, cfg_path)
    flags = megatron_flags_from_hf(cfg, arch, cfg_path, tp=tp, pp=pp, ep=ep)
    d = dims_from_hf(cfg, arch)
    weights = HFWeights(hf_dir, arch)
    weights.check(expected_hf_shapes(arch, d), cfg_path)
    return cfg, arch, d, flags, weights


def import_hf(hf: str, out: str, *, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False) -> dict:
    """Write the Megatron checkpoint `out` from the HF folder `hf`; returns a summary dict."""
    check_output(Path(out), "--out", overwrite)
    cfg, arch, d, flags, weights = prepare_import(hf, tp=tp, pp=pp, ep=ep)
    from megatron_moe_ext.convert.hf.megatron_model import build_gpt_model, save_checkpoint

    model, args = build_gpt_model(flags)
    filled = _fill_model(model, arch, d, weights)
    with staged_output(Path(out)) as stage:
        save_checkpoint(model, args, stage)
        (stage / FLAGS_FILE).write_text(shlex.join(flags) + "\n")
    return {
        "out": str(Path(out).resolve()),
        "architecture": cfg.get("architectures", [arch])[0],
        "layers": d.num_layers,
        "experts": d.experts,
        "tensors": filled,
        "parameters": sum(p.numel() for p in model.parameters()),
        "flags": shlex.join(flags),
    }


@torch.no_grad()
def _fill_model(model, arch: str, d, weights: HFWeights) -> int:
    """Copy HF tensors into every ShardedTensor of the model; layer by layer (one layer of HF
    tensors in memory). Returns how many ShardedTensors were filled."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # SwiGLU fc1 -> [gate; up] halves as views of the parameter
    tensors = [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]
    by_layer: Dict[int, list] = {}
    for sh in tensors:
        by_layer.setdefault(_layer_of(sh)[0], []).append(sh)
    for layer in sorted(by_layer):
        if layer < 0:
            src = {
                k: weights.get(
                    v if not (k == "output_layer.weight" and d.tied) else "model.embed_tokens.weight"
                )
                for k, v in GLOBAL_TO_HF.items()
                if any(sh.key == k for sh in by_layer[layer])
            }
        else:
            src = layer_from_hf(arch, d, layer, weights.get)
        for sh in by_layer[layer]:
            _, local, stacked = _layer_of(sh)
            if local not in src:
                raise RuntimeError(
                    f"import-hf has no HF source for Megatron tensor {sh.key}; the "
                    "Megatron model built from the flags has a tensor the mapping lacks."
                )
            region = sh.global_slice()[1:] if stacked else sh.global_slice()
            sh.data.copy_(src[local][region].reshape(sh.data.shape))
    return len(tensors)
