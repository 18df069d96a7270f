"""Megatron torch_dist checkpoint -> HuggingFace folder (config.json, generation_config.json,
safetensors in the per-expert layout, tokenizer when the run used a SentencePiece model).

Streams layer by layer: each decoder layer's tensors are read from the checkpoint's chunks,
mapped, cast and written straight into its shard file (headers are planned first), so host
memory holds about one layer, never the whole model nor a whole shard. Everything that can be
checked is checked before the first byte is written, and the output appears only when complete
(`outdir.staged_output`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

from megatron_moe_ext.convert.hf import plugin_arch
from megatron_moe_ext.convert.hf.arch import (
    choose_architecture,
    dims_from_args,
    hf_config_kwargs,
)
from megatron_moe_ext.convert.hf.dist_reader import CheckpointError, MegatronCheckpoint, resolve_iteration_dir
from megatron_moe_ext.convert.hf.mapping import GLOBAL_TO_HF, layer_to_hf
from megatron_moe_ext.convert.hf.outdir import check_output, staged_output
from megatron_moe_ext.convert.hf.plugin_arch import plugin_variant, write_modeling_file
from megatron_moe_ext.convert.hf.safetensors_out import StreamingSafetensorsWriter

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # 5 GB, the Hub default; shards are streamed, not buffered
_LAYER = "decoder.layers."


def export_hf(
    load: str,
    out: str,
    *,
    iteration: Optional[int] = None,
    dtype: Optional[str] = None,
    routing: str = "native",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> dict:
    """Write the HF folder `out` from the Megatron checkpoint `load`; returns a summary dict."""
    from tqdm import tqdm

    check_output(Path(out), "--out", overwrite)
    iter_dir, it_name = resolve_iteration_dir(Path(load), iteration)
    if Path(out).resolve() == iter_dir.resolve() or Path(out).resolve() in iter_dir.resolve().parents:
        raise CheckpointError(f"--out {out} would replace the checkpoint it reads; give another folder.")
    ckpt = MegatronCheckpoint(iter_dir)
    args = ckpt.args()
    arch = choose_architecture(args, routing)
    variant = plugin_variant(args, routing)
    d = dims_from_args(args)
    _check_keys(ckpt, d, scmoe=variant == "scmoe")
    torch_dtype = (
        DTYPES[dtype] if dtype else (torch.bfloat16 if getattr(args, "bf16", False) else torch.float32)
    )
    config = _hf_config(args, arch, torch_dtype, variant, ckpt, d)

    # Run the mapping once on meta tensors (shapes only, no data) to learn every output tensor's
    # name and shape in write order: the shard headers are then written before the data.
    plan = [(n, tuple(t.shape)) for _, n, t in _hf_tensors(ckpt, arch, d, meta=True)]
    with staged_output(Path(out)) as stage:
        writer = StreamingSafetensorsWriter(stage, plan, torch_dtype, max_shard_bytes)
        with tqdm(total=d.num_layers, desc="export-hf layers", disable=not progress) as bar:
            for layer, name, t in _hf_tensors(ckpt, arch, d):
                writer.add(name, t)
                if layer + 1 > bar.n:  # a layer started: the ones before it are done
                    bar.update(layer + 1 - bar.n)
        shards = writer.close()
        config.save_pretrained(str(stage))
        if variant:
            write_modeling_file(stage)
        _generation_config(config).save_pretrained(str(stage))
        tokenizer = _write_tokenizer(args, stage)
    summary = {
        "out": str(Path(out).resolve()),
        "source": str(iter_dir),
        "iteration": it_name,
        "architecture": config.architectures[0],
        "layers": d.num_layers,
        "experts": d.experts,
        "parameters": writer.num_params,
        "bytes": writer.total_bytes,
        "dtype": str(torch_dtype),
        "shards": len(shards),
        "tokenizer": tokenizer,
        "routing": "plain top-k" if routing == "topk" else "as trained",
    }
    return summary


def _hf_tensors(
    ckpt: MegatronCheckpoint, arch: str, d, meta: bool = False
) -> Iterator[Tuple[int, str, torch.Tensor]]:
    """(layer or -1, HF name, tensor) in write order, one layer read at a time; meta=True:
    shapes only (meta tensors, nothing read)."""

    def read(key, layer=None):
        if not meta:
            return ckpt.read(key, layer)
        shape = ckpt.shape(key)
        return torch.empty(tuple(shape)[1:] if layer is not None else tuple(shape), device="meta")

    yield -1, GLOBAL_TO_HF["embedding.word_embeddings.weight"], read("embedding.word_embeddings.weight")
    for layer in range(d.num_layers):

        def get(local, layer=layer):
            found = _layer_key(ckpt, local, layer)
            if found is None:
                return None
            key, stacked = found
            return read(key, layer) if stacked else read(key)

        for name, t in layer_to_hf(arch, d, layer, get).items():
            yield layer, name, t
    yield -1, GLOBAL_TO_HF["decoder.final_layernorm.weight"], read("decoder.final_layernorm.weight")
    if not d.tied:
        yield -1, GLOBAL_TO_HF["output_layer.weight"], read("output_layer.weight")


def _layer_key(ckpt: MegatronCheckpoint, local: str, layer: int):
    """(key, stacked) of layer `layer`'s tensor `local`, or None. Megatron stacks alike layers as
    `decoder.layers.<local>` [layers, ...] and keys unlike ones (--moe-layer-freq patterns) as
    `decoder.layers.<layer>.<local>`."""
    if ckpt.has(_LAYER + local):
        return _LAYER + local, True
    if ckpt.has(f"{_LAYER}{layer}.{local}"):
        return f"{_LAYER}{layer}.{local}", False
    return None


def _check_keys(ckpt: MegatronCheckpoint, d, scmoe: bool = False) -> None:
    """Every tensor the mapping needs is present, with the shape the args promise."""
    for key in ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"] + (
        [] if d.tied else ["output_layer.weight"]
    ):
        if not ckpt.has(key):
            raise CheckpointError(f"{ckpt.dir} has no tensor {key}, which its saved args imply.")
    for layer in range(d.num_layers):
        need = [
            "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight",
            "self_attention.linear_qkv.layer_norm_weight",
            "mlp.linear_fc1.layer_norm_weight",
        ]
        if d.qk_norm:
            need += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
        if d.moe_layers[layer]:
            need += [
                "mlp.router.weight",
                "mlp.experts.experts.linear_fc1.weight",
                "mlp.experts.experts.linear_fc2.weight",
            ]
            if d.shared_ffn:
                need += [
                    f"mlp.shared_experts.{k}"
                    for k in ("linear_fc1.weight", "linear_fc2.weight", "gate_weight")
                ]
            if scmoe:
                need += ["shortcut_layernorm.weight"]
        else:
            need += ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
        for local in need:
            found = _layer_key(ckpt, local, layer)
            if found is None:
                raise CheckpointError(
                    f"{ckpt.dir} has no tensor {local} for layer {layer}, which its saved "
                    "args imply; the checkpoint does not match its args."
                )
            key, stacked = found
            if stacked and ckpt.shape(key)[0] != d.num_layers:
                raise CheckpointError(
                    f"{ckpt.dir}: {key} has {ckpt.shape(key)[0]} layers, args say {d.num_layers}."
                )
            if local == "mlp.experts.experts.linear_fc1.weight":
                shape = tuple(ckpt.shape(key)[1:] if stacked else ckpt.shape(key))
                if shape != (d.experts, 2 * d.moe_ffn, d.hidden):
                    raise CheckpointError(
                        f"{ckpt.dir}: expert fc1 of layer {layer} is {list(shape)}, args "
                        f"imply {[d.experts, 2 * d.moe_ffn, d.hidden]}."
                    )


def _hf_config(args, arch: str, torch_dtype, variant: Optional[str], ckpt: MegatronCheckpoint, d):
    """The stock architecture's config, or the plugin variant's (plugin_arch.py)."""
    from transformers import AutoConfig

    kwargs = hf_config_kwargs(args, arch)
    if variant is None:
        cfg = AutoConfig.for_model(arch, **kwargs)
    else:
        def read_layer(local: str, layer: int):
            found = _layer_key(ckpt, local, layer)
            if found is None:
                return None
            key, stacked = found
            return ckpt.read(key, layer) if stacked else ckpt.read(key)

        cfg = plugin_arch.config(args, arch, variant, kwargs, read_layer, list(d.moe_layers))
    cfg.dtype = torch_dtype
    return cfg


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig.from_model_config(config)


def _write_tokenizer(args, out: Path) -> Optional[str]:
    """The run's SentencePiece model as a tokenizer transformers loads; None when the run used
    another tokenizer (or its model file is gone: then a note says so)."""
    from megatron_moe_ext.convert.hf.tokenizer import write_sentencepiece_tokenizer

    kind = getattr(args, "tokenizer_type", None)
    model = getattr(args, "tokenizer_model", None)
    if kind not in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer") or not model:
        return None
    if not Path(model).is_file():
        print(f"export-hf: the run's tokenizer {model} is not found; no tokenizer written.")
        return None
    written, why = write_sentencepiece_tokenizer(Path(model), out)
    if not written:
        print(f"export-hf: tokenizer {model} not written: {why}.")
    return written
