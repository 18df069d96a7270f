"""Expert collaboration: co-activation counts, specialization metrics and partner lists (C2R).

C[i, j] counts tokens that chose both expert i and expert j in one layer (raw counts, no
normalization, as the C2R profiler does); the diagonal holds tokens per expert. Partner lists rank,
for each expert, the others it should be allowed to pair with: C2R routes top-1 freely and the
remaining k-1 among the top-1's first T partners.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_moe_ext.routing.topology import EPTopology


def coactivation_counts(routing_map: torch.Tensor) -> torch.Tensor:
    """BoolTensor[T, E] -> Float64Tensor[E, E], C = M^T M (symmetric; diagonal = expert load).

    Counts add over batches, so accumulate by summing the results (on any device)."""
    m = routing_map.double()
    return m.t() @ m


def _off_diagonal(coact: torch.Tensor) -> torch.Tensor:
    c = coact.double().clone()
    c.fill_diagonal_(0)
    return c


def specialization_metrics(coact: torch.Tensor, coverage: float = 0.9) -> Dict[str, List[float]]:
    """Per-expert measures of how collaborative (spread) or specialized (concentrated) it is.

    Row i of the off-diagonal counts, normalized to p_ij, gives:
      entropy (nats): -sum_j p_ij log p_ij; high = collaborative;
      partners_for_coverage: fewest partners whose p_ij add up to `coverage`;
      top_partner_share: max_j p_ij.
    Experts never co-activated get entropy 0, 0 partners and share 0.
    Returns lists of length E under those keys."""
    c = _off_diagonal(coact)
    row = c.sum(1, keepdim=True)
    p = torch.where(row > 0, c / row.clamp_min(1e-300), torch.zeros_like(c))
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    sorted_p = p.sort(dim=1, descending=True).values
    needed = (sorted_p.cumsum(1) < coverage - 1e-12).sum(1) + 1
    needed = torch.where(row.squeeze(1) > 0, needed, torch.zeros_like(needed))
    return {"entropy": entropy.tolist(), "partners_for_coverage": needed.tolist(),
            "top_partner_share": sorted_p[:, 0].tolist()}


def partner_lists(coact: torch.Tensor, top_t: int, *, expert_to_rank: Optional[torch.Tensor] = None,
                  co_resident_only: bool = False) -> torch.Tensor:
    """Top-T collaborators of every expert: LongTensor[E, top_t], most co-activated first.

    With `co_resident_only`, partners are limited to experts on the same EP rank
    (`expert_to_rank`, LongTensor[E]) so that a token's experts all live on its top-1's rank;
    this needs top_t <= experts per rank - 1. Ties go to the lower expert index."""
    E = coact.shape[0]
    if not 0 <= top_t <= E - 1:
        raise ValueError(f"top_t {top_t} must be between 0 and {E - 1} (experts - 1).")
    c = _off_diagonal(coact)
    key = c.clone()
    if co_resident_only:
        if expert_to_rank is None:
            raise ValueError("co_resident_only needs expert_to_rank.")
        same = expert_to_rank.unsqueeze(0) == expert_to_rank.unsqueeze(1)
        per_rank = int(same[0].sum())
        if top_t > per_rank - 1:
            raise ValueError(f"top_t {top_t} exceeds the {per_rank - 1} co-resident partners an "
                             f"expert has with {per_rank} experts per rank.")
        key = torch.where(same, key, torch.full_like(key, -1.0))
    key.fill_diagonal_(-2.0)  # self sorts last
    # stable sort on (-count, index): sort by index first, then stably by count
    order = torch.argsort(-key, dim=1, stable=True)
    return order[:, :top_t].contiguous()


def default_partner_lists(topology: EPTopology, top_t: int) -> torch.Tensor:
    """Partners without a profile: co-resident experts first, then the experts of the next
    ranks in cyclic order (r+1, r+2, ...), each block by index. LongTensor[E, top_t].

    So top_t <= experts_per_rank - 1 keeps every token on one rank, and top_t = E - 1 allows
    every expert, i.e. plain top-k."""
    E, ep, L = topology.num_experts, topology.ep_size, topology.experts_per_rank
    if not 0 <= top_t <= E - 1:
        raise ValueError(f"top_t {top_t} must be between 0 and {E - 1} (experts - 1).")
    e = torch.arange(E)
    rank = topology.expert_to_rank()
    # distance of every expert's rank from expert i's rank, cyclic; then the index breaks ties
    rank_dist = (rank.unsqueeze(0) - rank.unsqueeze(1)) % ep                # [E, E]
    key = rank_dist * E + (e.unsqueeze(0) - rank.unsqueeze(0) * L)          # rank block, then slot
    key.fill_diagonal_(E * ep + 1)                                          # self last
    return torch.argsort(key, dim=1)[:, :top_t].contiguous()
