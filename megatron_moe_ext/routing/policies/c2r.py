"""Collaboration-constrained top-k (C2R): top-1 free, the other k-1 among the top-1's partners.

This is the rule of the official C2R code: i* = argmax_e s_e, then the k-1 best-scoring experts of
Top-T(i*) = partners[i*]. It only chooses indices; the probabilities come from the router's own
score function at those indices (Megatron's `topk_routing_with_score_function(precomputed_indices)`),
so softmax/sigmoid, pre-softmax, scaling and expert-bias conventions stay the model's.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_moe_ext.routing.scores import indices_to_map
from megatron_moe_ext.routing.topology import EPTopology


def c2r_select(scores: torch.Tensor, topk: int, partners: torch.Tensor) -> torch.Tensor:
    """Chosen experts under the collaboration constraint.

    Args:
        scores: [T, E], what the router ranks (any monotone transform of its preference).
        topk: experts per token, k.
        partners: LongTensor[E, top_t], expert i may pair only with partners[i] (top_t >= k-1).

    Returns:
        LongTensor[T, k]: column 0 is the top-1 expert, columns 1.. its best k-1 partners.
    """
    top_t = partners.shape[1]
    if top_t < topk - 1:
        raise ValueError(f"top_t {top_t} leaves fewer than k-1 = {topk - 1} partners to choose from.")
    top1 = scores.argmax(dim=1)                                  # [T]
    if topk == 1:
        return top1.unsqueeze(1)
    candidates = partners.to(scores.device)[top1]               # [T, top_t]
    cand_scores = scores.gather(1, candidates)                   # [T, top_t]
    best = cand_scores.topk(topk - 1, dim=1).indices              # [T, k-1]
    return torch.cat([top1.unsqueeze(1), candidates.gather(1, best)], dim=1)


def resolve_top_t(top_t: Optional[int], topology: EPTopology, topk: int, *, flag: str = "--moe-c2r-top-t") -> int:
    """T, defaulting to the co-resident partner count (experts per rank - 1: one rank per token),
    checked against k and E. Raises ValueError naming `flag`."""
    T = topology.experts_per_rank - 1 if top_t is None else top_t
    if T < topk - 1:
        raise ValueError(
            f"{flag} {T} is less than k-1 = {topk - 1} (--moe-router-topk {topk}); a token needs at "
            "least k-1 partners" + ("" if top_t is not None else
                                    ", and the default (experts per rank - 1) is too small here, so set it") + ".")
    if T > topology.num_experts - 1:
        raise ValueError(f"{flag} {T} exceeds the {topology.num_experts - 1} other experts.")
    return T


def offline_route(scores: torch.Tensor, topk: int, ctx) -> torch.Tensor:
    """C2R with the plan's partners for ctx.layer (any layer of the plan for synthetic logits),
    or the default lists: co-resident experts first, then the next ranks'."""
    from megatron_moe_ext.routing.collaboration import default_partner_lists

    topo = ctx.topology
    plan = ctx.options.get("plan")  # a loaded files.plan.Plan, checked against the topology
    if plan is not None:
        layer = ctx.layer if ctx.layer in plan.partners else min(plan.partners)
        partners = plan.partners[layer]
    else:
        top_t = resolve_top_t(ctx.options.get("top_t"), topo, topk, flag="--top-t")
        partners = default_partner_lists(topo, top_t)
    return indices_to_map(c2r_select(scores, topk, partners), topo.num_experts)
