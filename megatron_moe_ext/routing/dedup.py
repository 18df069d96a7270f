"""Index math of rank-deduplicated dispatch (pure torch): one row per (token, destination rank).

A token routed to several experts of the same EP rank travels to that rank once, carrying its
[L] slice of the routing map and probabilities (L = experts per rank); the receiver expands it
per local expert. This is the layout DeepEP's dispatch uses; here it is built from the routing map
so it also works with Megatron's plain all-to-all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RankRows(NamedTuple):
    """Rows to send, grouped by destination rank (rank-major, tokens ascending within a rank)."""

    token: torch.Tensor        # LongTensor[n], source token of each row
    rank: torch.Tensor         # LongTensor[n], destination EP rank of each row
    rows_per_rank: torch.Tensor  # LongTensor[ep], n = rows_per_rank.sum()


def rank_rows(routing_map: torch.Tensor, ep_size: int) -> RankRows:
    """BoolTensor[T, E] (experts contiguous per rank) -> the (token, rank) rows to send."""
    T, E = routing_map.shape
    L = E // ep_size
    rank_map = routing_map.view(T, ep_size, L).any(-1)             # [T, ep]
    rows_per_rank = rank_map.sum(0)                                 # [ep]
    n = int(rows_per_rank.sum())
    # Stable argsort of the rank-major flattening lists (rank, token) pairs in order.
    flat = rank_map.t().reshape(-1).to(torch.int8)
    order = flat.argsort(descending=True, stable=True)[:n]
    return RankRows(order % T, order // T, rows_per_rank)


def local_slices(x: torch.Tensor, rows: RankRows, ep_size: int) -> torch.Tensor:
    """[T, E] probabilities or map -> [n, L], each row's slice for the experts of its rank."""
    T, E = x.shape
    return x.view(T, ep_size, E // ep_size)[rows.token, rows.rank]
