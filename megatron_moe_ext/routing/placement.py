"""Balanced expert placement that keeps collaborating experts on the same EP rank.

A placement assigns each of E experts to one of `ep` ranks, E/ep per rank. Its quality is the
share of off-diagonal co-activation that stays inside ranks. The search is a seeded local search:
start from several assignments (identity, then random), repeatedly apply the best pairwise swap
between ranks while it gains (Kernighan-Lin style, with the gain of every pair computed at once),
and keep the best. Physical layout: the experts of rank r occupy slots r*L .. r*L+L-1 in
ascending logical order, `expert_to_slot[e]` is expert e's slot; checkpoints store experts by slot.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_moe_ext.routing.collaboration import partner_lists
from megatron_moe_ext.routing.topology import EPTopology


def intra_rank_fraction(coact: torch.Tensor, expert_to_rank: torch.Tensor) -> float:
    """Share of off-diagonal co-activation between experts on the same rank (0..1)."""
    c = coact.double().clone()
    c.fill_diagonal_(0)
    total = c.sum()
    if total <= 0:
        return 0.0
    same = expert_to_rank.unsqueeze(0) == expert_to_rank.unsqueeze(1)
    return float((c * same).sum() / total)


def _improve(c: torch.Tensor, rank: torch.Tensor, ep: int, max_swaps: int) -> torch.Tensor:
    """Best-improvement pairwise swaps until none gains. c: off-diagonal counts [E, E]."""
    rank = rank.clone()
    for _ in range(max_swaps):
        s = c @ torch.nn.functional.one_hot(rank, ep).double()           # [E, ep] ties to each rank
        own = s.gather(1, rank.unsqueeze(1))                              # [E, 1]
        to_other = s[:, rank]                                             # [E, E]: s[i, rank_j]
        # gain of swapping i and j = new ties - old ties (their mutual tie is counted twice)
        gain = (to_other - own) + (to_other - own).t() - 2 * c
        gain[rank.unsqueeze(0) == rank.unsqueeze(1)] = float("-inf")
        flat = int(gain.argmax())
        i, j = divmod(flat, gain.shape[1])
        if gain[i, j] <= 1e-9:
            break
        rank[i], rank[j] = rank[j].clone(), rank[i].clone()
    return rank


def balanced_placement(coact: torch.Tensor, ep_size: int, *, restarts: int = 8, seed: int = 0,
                       max_swaps: int = 10_000) -> torch.Tensor:
    """EP rank of every expert (LongTensor[E], E/ep each) maximizing intra-rank co-activation."""
    E = coact.shape[0]
    if E % ep_size:
        raise ValueError(f"{E} experts do not divide over {ep_size} EP ranks.")
    c = coact.double().clone()
    c.fill_diagonal_(0)
    c = (c + c.t()) / 2
    L = E // ep_size
    g = torch.Generator().manual_seed(seed)
    best, best_score = None, -1.0
    for r in range(max(1, restarts)):
        start = EPTopology(E, ep_size, ep_size).expert_to_rank() if r == 0 else torch.randperm(E, generator=g) // L
        rank = _improve(c, start, ep_size, max_swaps)
        score = intra_rank_fraction(c, rank)
        if score > best_score + 1e-12:
            best, best_score = rank, score
    return best


def expert_to_slot_from_ranks(expert_to_rank: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Physical slot of every expert: rank r's experts fill slots r*L.. in ascending order."""
    E = expert_to_rank.numel()
    L = E // ep_size
    slot = torch.empty(E, dtype=torch.long)
    for r in range(ep_size):
        members = (expert_to_rank == r).nonzero().flatten()
        if members.numel() != L:
            raise ValueError(f"rank {r} holds {members.numel()} experts, expected {L}.")
        slot[members] = torch.arange(r * L, (r + 1) * L)
    return slot


def random_placement(num_experts: int, ep_size: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random balanced placement (a baseline for reports)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_experts, generator=g) // (num_experts // ep_size)


def permute_coactivation(coact: torch.Tensor, expert_to_slot: torch.Tensor,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Co-activation indexed by physical slot: C_phys[slot[i], slot[j]] = C[i, j]."""
    inv = torch.empty_like(expert_to_slot)
    inv[expert_to_slot] = torch.arange(expert_to_slot.numel())
    return coact[inv][:, inv]


def plan_layer(coact: torch.Tensor, ep: int, top_t: int, *, co_resident_only: bool,
               keep_placement: bool, seed: int):
    """One layer's plan from its co-activation [E, E]: (expert_to_slot LongTensor[E], partners
    LongTensor[E, top_t] indexed by physical slot, report {"planned", "identity", "random"} of
    intra-rank co-activation shares)."""
    E = coact.shape[0]
    identity = EPTopology(E, ep, ep).expert_to_rank()
    rank = identity if keep_placement else balanced_placement(coact, ep, seed=seed)
    slot = expert_to_slot_from_ranks(rank, ep)
    logical = partner_lists(coact, top_t, expert_to_rank=rank, co_resident_only=co_resident_only)
    physical = torch.empty_like(logical)
    physical[slot] = slot[logical]        # row slot[e] lists the slots of e's partners
    report = {"planned": intra_rank_fraction(coact, rank),
              "identity": intra_rank_fraction(coact, identity),
              "random": intra_rank_fraction(coact, random_placement(E, ep, seed=seed + 1))}
    return slot, physical, report
