"""Decoder block specs carrying the plugin's options into Megatron's layers.

Usable two ways, both through `training/plugin.configure_model`, which binds the plugin's config:
  * the plugin's pretrain entry (and the patched Megatron-LM `pretrain_gpt.py`) install
    `partial(moe_ext_decoder_block_spec, ext_cfg=...)` on the GPTModelConfig;
  * `--spec megatron_moe_ext.mcore.specs moe_ext_decoder_block_spec` names this function, and
    `configure_model` binds the config to it the same way. The spec never reads Megatron's
    global args.

The block starts as Megatron's own default for the model (`default_layer_spec`: TE or local,
MoE placement by `--moe-layer-freq`) and only the MoE layers' submodules are replaced, so every
other Megatron option keeps its meaning.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Optional

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec, get_submodules

from megatron_moe_ext.config import MoEExtConfig


def moe_ext_decoder_block_spec(model_cfg: Any, vp_stage: Optional[int] = None,
                               ext_cfg: Optional[MoEExtConfig] = None) -> ModuleSpec:
    """Megatron's default block spec for `model_cfg` (a GPTModelConfig), with the plugin's routing
    policy installed in every MoE layer."""
    from megatron.training.models.gpt import default_layer_spec

    if ext_cfg is None:
        raise ValueError("moe_ext_decoder_block_spec needs the plugin's config (ext_cfg); "
                         "megatron_moe_ext.training.plugin.configure_model binds it.")
    block = default_layer_spec(model_cfg, vp_stage)
    router_cls = router_class_for(ext_cfg)
    layer_cls = moe_layer_class_for(ext_cfg)
    subs = {} if router_cls is None else {"router": router_cls}
    if ext_cfg.expert_backend == "torch":
        from megatron_moe_ext.experts import torch_experts

        subs["experts"] = torch_experts
    if subs or layer_cls is not None:
        block = replace_moe_submodules(block, layer_cls=layer_cls, **subs)
    if ext_cfg.scmoe != "off":
        from megatron_moe_ext.mcore.scmoe_spec import apply_scmoe

        if getattr(block, "layer_specs", None) is None:
            raise ValueError("--moe-scmoe needs a decoder block spec (per-layer specs), not one layer spec.")
        block = apply_scmoe(block, ext_cfg, model_cfg.transformer, vp_stage)
    return block


def moe_layer_class_for(ext_cfg: MoEExtConfig) -> Optional[Callable]:
    """The MoE layer builder: DedupMoELayer for --moe-dedup-dispatch, DeviceSplitsMoELayer for the
    torch experts (no host wait on one EP rank; --moe-ep1-host-splits keeps Megatron's
    dispatcher there); None keeps Megatron's MoELayer."""
    layer_cls = None
    if ext_cfg.dedup_dispatch:
        from megatron_moe_ext.mcore.dispatch import DedupMoELayer

        layer_cls = DedupMoELayer
    elif ext_cfg.expert_backend == "torch":
        from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer

        layer_cls = DeviceSplitsMoELayer
    if layer_cls is not None and ext_cfg.ep1_host_splits:
        layer_cls = functools.partial(layer_cls, device_splits=False)
    return layer_cls


def router_class_for(ext_cfg: MoEExtConfig) -> Optional[Callable]:
    """The router builder for the configured policy (routing/policies' registry names the
    adapter class); None keeps Megatron's own TopKRouter for plain top-k."""
    from megatron_moe_ext.routing.policies import get_policy

    if ext_cfg.router_policy == "topk" and ext_cfg.scmoe != "dgmoe" and ext_cfg.router_kernel == "megatron":
        return None  # DGMoE's current pass excludes experts, and the fused kernel needs a PolicyRouter
    module, name = get_policy(ext_cfg.router_policy).router.split(":")
    cls = getattr(importlib.import_module(module), name)
    return functools.partial(cls, ext_cfg=ext_cfg)


def replace_moe_submodules(block: Any, *, layer_cls: Optional[Callable] = None, **submodules: Any) -> Any:
    """Return `block` (TransformerBlockSubmodules or a layer ModuleSpec) with every MoE layer's
    MoESubmodules fields replaced by `submodules` (e.g. router=MyRouter) and, if given, the MoE
    layer class replaced by `layer_cls` (a MoELayer subclass)."""
    layer_specs = getattr(block, "layer_specs", None)
    if layer_specs is None:  # a single layer spec
        return _replace_in_layer(block, layer_cls, submodules)
    return dataclasses.replace(block, layer_specs=[_replace_in_layer(ls, layer_cls, submodules)
                                                   for ls in layer_specs])


def _replace_in_layer(layer_spec: ModuleSpec, layer_cls, submodules) -> ModuleSpec:
    mlp = layer_spec.submodules.mlp
    mlp_cls = mlp.func if isinstance(mlp, functools.partial) else getattr(mlp, "module", None)
    if not (isinstance(mlp_cls, type) and issubclass(mlp_cls, MoELayer)):
        return layer_spec
    moe_subs = dataclasses.replace(get_submodules(mlp), **submodules)
    new_mlp = functools.partial(layer_cls or mlp_cls, submodules=moe_subs)
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=new_mlp))
