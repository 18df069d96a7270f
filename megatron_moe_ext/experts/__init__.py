"""Routed-expert backends for `--moe-expert-backend torch`: torch grouped GEMM, BF16 or FP8."""

from __future__ import annotations

from typing import Optional


def torch_experts(num_local_experts: int, config, submodules=None, pg_collection=None,
                  name: Optional[str] = None):
    """Megatron experts builder: FP8 GEMMs when the model runs FP8 (`--fp8-format`), else BF16."""
    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cls = TorchFP8GroupedMLP if config.fp8 else TorchGroupedMLP
    return cls(num_local_experts, config, submodules, pg_collection=pg_collection, name=name)
