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

from megatron_moe_ext.config import (
    MoEExtConfig,
    moe_layer_pattern,
    scmoe_recompute_problem,
    scmoe_shortcut_sources,
)
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
