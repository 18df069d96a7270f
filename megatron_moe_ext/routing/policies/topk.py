"""Plain top-k: the k best-scoring experts (Megatron's TopKRouter)."""

from __future__ import annotations

import torch

from megatron_moe_ext.routing.scores import indices_to_map


def topk_select(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """scores [T, E] -> chosen experts LongTensor[T, k]."""
    return torch.topk(scores, topk, dim=1).indices


def offline_route(scores: torch.Tensor, topk: int, ctx) -> torch.Tensor:
    return indices_to_map(topk_select(scores, topk), scores.shape[1])
