"""Turn a Megatron decoder block spec into an ScMoE/DGMoE one (`--moe-scmoe`).

Each MoE layer becomes an `ScMoELayer`; under pos2/dgmoe the dense layer right before it becomes
an `ScMoEProducerLayer`, and the two share a `ShortcutLink`. Parameter names stay Megatron's,
plus `shortcut_layernorm.*` in each MoE layer, so checkpoints of the other modules keep their keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from megatron_moe_ext.config import MoEExtConfig
from megatron_moe_ext.mcore.scmoe_layer import (
    ScMoELayer,
    ScMoELayerSubmodules,
    ScMoEProducerLayer,
    ShortcutLink,
)


def apply_scmoe(block: Any, ext_cfg: MoEExtConfig, config: Any, vp_stage: Optional[int] = None,
                layer_offset: Optional[int] = None) -> Any:
    """block: TransformerBlockSubmodules of this pipeline stage; config: its TransformerConfig.
    Returns a copy with ScMoE layers. Raises ValueError when a pair would be split (pipeline
    stage boundary, recomputation chunk) or a layer is not a plain TransformerLayer."""
    mode = ext_cfg.scmoe
    specs: List[ModuleSpec] = list(block.layer_specs)
    offset = get_transformer_layer_offset(config, vp_stage) if layer_offset is None else layer_offset
    pattern = moe_layer_pattern(config.moe_layer_freq, config.num_layers)
    sources = scmoe_shortcut_sources(pattern, mode)
    _check_recompute(config, [(g - 1 - offset, g - offset) for g, src in sources.items()
                              if src is not None and offset <= g < offset + len(specs)])
    for i, spec in enumerate(specs):
        g = offset + i
        if g not in sources:
            continue
        _require_plain_layer(spec, g)
        link = None
        if sources[g] is not None:
            if i == 0:
                raise ValueError(
                    f"--moe-scmoe {mode}: MoE layer {g + 1} reads layer {g}'s post-attention stream, "
                    "but a pipeline stage boundary falls between them; split stages on block-pair "
                    "boundaries (--decoder-first-pipeline-num-layers or --pipeline-model-parallel-layout).")
            _require_plain_layer(specs[i - 1], g - 1)
            link = ShortcutLink()
            specs[i - 1] = ModuleSpec(module=ScMoEProducerLayer, submodules=specs[i - 1].submodules,
                                      params={**specs[i - 1].params, "shortcut_link": link})
        subs = spec.submodules
        fields = {f.name: getattr(subs, f.name) for f in dataclasses.fields(subs)}
        specs[i] = ModuleSpec(
            module=ScMoELayer,
            submodules=ScMoELayerSubmodules(**fields, shortcut_layernorm=subs.pre_mlp_layernorm),
            params={**spec.params, "scmoe_mode": mode, "shortcut_link": link,
                    "expert_slot": ext_cfg.scmoe_expert_slot})
    return dataclasses.replace(block, layer_specs=specs)


def _require_plain_layer(spec: ModuleSpec, g: int) -> None:
    if getattr(spec, "module", None) is not TransformerLayer:
        raise ValueError(f"--moe-scmoe needs plain TransformerLayer specs; layer {g + 1} is "
                         f"{getattr(spec, 'module', spec)!r}.")


def _check_recompute(config: Any, local_pairs: List[tuple]) -> None:
    """Both layers of a pair must be recomputed together (the shortcut crosses them)."""
    problem = scmoe_recompute_problem(config.recompute_granularity, config.recompute_method,
                                      getattr(config, "recompute_modules", None))
    if problem:
        raise ValueError(problem)
    if config.recompute_granularity != "full":
        return
    n = config.recompute_num_layers
    for producer, consumer in local_pairs:
        if producer // n != consumer // n:
            raise ValueError(
                f"--recompute-num-layers {n} splits an ScMoE pair (stage-local layers {producer} and "
                f"{consumer}); choose a multiple of 2 that keeps each dense layer with its MoE layer.")


def scmoe_problem(mode: str, settings: Any, topk: int) -> Optional[str]:
    """The sentence refusing a Megatron setting ScMoE/DGMoE layers cannot run with, or None,
    checked at argument parsing (`settings`: Megatron's args)."""
    get = lambda name, default=None: getattr(settings, name, default)  # noqa: E731
    flag = f"--moe-scmoe {mode}"
    if get("overlap_moe_expert_parallel_comm"):
        return (f"{flag} overlaps its own all-to-all inside the layer, while "
                "--overlap-moe-expert-parallel-comm replaces the layer's forward with per-module "
                "callables that would skip the shortcut; drop --overlap-moe-expert-parallel-comm.")
    for bad, what in ((get("moe_shared_expert_overlap"), "--moe-shared-expert-overlap (ScMoE schedules "
                       "the shared expert itself)"),
                      (get("moe_latent_size"), "--moe-latent-size"),
                      (get("overlap_dispatch_backward_with_experts_wgrad"),
                       "--overlap-dispatch-backward-with-experts-wgrad"),
                      (get("cuda_graph_impl", "none") not in (None, "none"), "--cuda-graph-impl")):
        if bad:
            return f"{flag} does not support {what}; drop it."
    shared = get("moe_shared_expert_intermediate_size")
    if mode == "dgmoe" and shared:
        return ("--moe-scmoe dgmoe has no shared expert (its two gated passes match top-2 compute); "
                "drop --moe-shared-expert-intermediate-size.")
    if mode != "dgmoe" and not shared:
        return (f"{flag} adds a shared dense expert on the current stream; set "
                "--moe-shared-expert-intermediate-size (for example the expert FFN size).")
    if mode != "dgmoe" and not get("moe_shared_expert_gate"):
        return f"{flag} scales the shared expert by the CG-1 sigmoid gate; add --moe-shared-expert-gate."
    if (topk == 1 and get("moe_router_score_function", "softmax") == "softmax"
            and not get("moe_router_pre_softmax")):
        return (f"{flag} with top-1 routing needs --moe-router-pre-softmax: a softmax over one "
                "selected logit is exactly 1, and the gate would learn only from the aux loss.")
    num_layers = get("num_layers")
    if num_layers:
        try:
            scmoe_shortcut_sources(moe_layer_pattern(get("moe_layer_freq", 1), num_layers), mode)
        except ValueError as e:
            return str(e)
    return scmoe_recompute_problem(get("recompute_granularity"), get("recompute_method"),
                                   get("recompute_modules"))


def moe_layer_pattern(moe_layer_freq, num_layers: int) -> list:
    """Megatron's MoE placement (gpt_layer_specs.py): 1 = MoE layer. An int N puts an MoE layer at
    every index divisible by N (layer 0 included); a list is the pattern itself."""
    if isinstance(moe_layer_freq, int):
        return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers:
        raise ValueError(f"--moe-layer-freq has {len(pattern)} entries for {num_layers} layers.")
    return pattern


def scmoe_recompute_problem(granularity: Optional[str], method: Optional[str], modules) -> Optional[str]:
    """The sentence refusing a recomputation setting that would separate an ScMoE shortcut from
    the layers it joins, or None. (Where chunk boundaries fall needs the stage's layer offsets:
    scmoe_spec checks that when the block is built.)"""
    if granularity == "full" and method != "uniform":
        return ("--moe-scmoe with full recomputation needs --recompute-method uniform, so that a "
                "dense layer and the MoE layer reading it are recomputed together.")
    if granularity == "selective" and set(modules or []) & {"moe", "mlp"}:
        return ("--moe-scmoe schedules the MoE itself, so --recompute-modules moe/mlp would not "
                "apply to its layers; drop them.")
    return None


def scmoe_shortcut_sources(pattern: list, mode: str) -> dict:
    """{MoE layer index: index of the dense layer whose post-attention stream its routed experts
    read, or None for its own input}. pos1 always reads the layer input; pos2 and dgmoe read the
    dense layer before (the first layer, with nothing before it, reads its input, the paper's
    "Pos-2 (L0 Pos-1)"); pos2 after another MoE layer has no dense block to read, an error, while
    dgmoe then reads its own input."""
    sources = {}
    for g, is_moe in enumerate(pattern):
        if not is_moe:
            continue
        if mode == "pos1" or g == 0:
            sources[g] = None
        elif not pattern[g - 1]:
            sources[g] = g - 1
        elif mode == "pos2":
            raise ValueError(
                f"--moe-scmoe pos2 pairs each MoE layer with the dense layer before it, but layers {g} "
                f"and {g + 1} are both MoE; use --moe-scmoe pos1 for every-layer MoE, or a "
                "--moe-layer-freq that alternates dense and MoE layers.")
        else:
            sources[g] = None
    return sources
