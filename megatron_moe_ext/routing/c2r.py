"""Collaboration-constrained top-k (C2R): top-1 free, the other k-1 among the top-1's partners.

This is the rule of the official C2R code: i* = argmax_e s_e, then the k-1 best-scoring experts of
Top-T(i*) = partners[i*]. It only chooses indices; the probabilities come from the router's own
score function at those indices (Megatron's `topk_routing_with_score_function(precomputed_indices)`),
so softmax/sigmoid, pre-softmax, scaling and expert-bias conventions stay the model's.
"""

from __future__ import annotations

import torch


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
