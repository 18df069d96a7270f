"""Shared set-up for the torchrun scripts under tests/dist (real Megatron classes, gloo, CPU)."""

from __future__ import annotations

import json
import os
from typing import Dict

import torch

from megatron_moe_ext.compat.cpu import enable_cpu_compat, reset_rng_tracker_for_cpu
from megatron_moe_ext.compat.presets import CPU_TRANSFORMER_CONFIG_KWARGS

enable_cpu_compat()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402


def init_distributed() -> None:
    """Initialise gloo from torchrun's environment (once per process)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def init_model_parallel(*, tp: int = 1, ep: int = 1) -> None:
    """(Re)build Megatron's process groups, so one script can compare EP sizes."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
    reset_rng_tracker_for_cpu()


def moe_config(**overrides):
    """A tiny MoE TransformerConfig for CPU tests; keyword overrides win."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=1, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2,
        num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", add_bias_linear=False,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        **CPU_TRANSFORMER_CONFIG_KWARGS,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def global_moe_weights(cfg, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic weights for every expert (global indices) and the router."""
    g = torch.Generator().manual_seed(seed)
    E, H = cfg.num_moe_experts, cfg.hidden_size
    F = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    fc1_out = 2 * F if cfg.gated_linear_unit else F
    return {
        "router": torch.randn(E, H, generator=g) * 0.5,
        "fc1": torch.randn(E, fc1_out, H, generator=g) / H**0.5,
        "fc2": torch.randn(E, H, F, generator=g) / F**0.5,
    }


def load_moe_weights(layer, weights: Dict[str, torch.Tensor]) -> None:
    """Copy global weights into a (SequentialMLP) MoELayer's local experts and its router."""
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        for i, e in enumerate(layer.local_expert_indices):
            expert = layer.experts.local_experts[i]
            expert.linear_fc1.weight.copy_(weights["fc1"][e])
            expert.linear_fc2.weight.copy_(weights["fc2"][e])


def write_result(path: str, result: dict) -> None:
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
