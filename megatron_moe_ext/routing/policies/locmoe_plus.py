"""LocMoE+ (expert-token resonance): token-choice top-l by affinity, then expert-choice top-C.

A token proposes its fewest top experts whose affinities reach tau x its positive affinity sum
(at most k); each expert keeps the C proposing tokens of highest affinity; tokens kept nowhere
ride the residual path. Affinity is the cosine between the token and the expert's gate vector.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from megatron_moe_ext.routing.locality import expert_choice_keep, token_choice_map


def base_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Megatron's capacity: ceil(T k / E x factor) tokens per expert."""
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def resonance_route(aff: torch.Tensor, topk: int, tau: float, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """aff [T, E] -> (order LongTensor[T, k] of experts by affinity, keep Bool[T, E])."""
    order, proposed = token_choice_map(aff, topk, tau)
    return order, expert_choice_keep(aff, proposed, capacity)


def offline_route(scores: torch.Tensor, topk: int, ctx) -> torch.Tensor:
    """Per source rank's tokens (each rank routes its own batch in training). Without recorded
    affinities (synthetic logits) the scores stand in for them."""
    aff = ctx.affinity if ctx.affinity is not None else scores
    tau = float(ctx.options.get("tau", 0.8))
    cf = float(ctx.options.get("capacity_factor", 1.0))
    keep = torch.zeros_like(aff, dtype=torch.bool)
    for rank in ctx.src_ep_rank.unique().tolist():
        rows = (ctx.src_ep_rank == rank).nonzero().flatten()
        cap = base_capacity(rows.numel(), topk, aff.shape[1], cf)
        keep[rows] = resonance_route(aff[rows], topk, tau, cap)[1]
    return keep
