"""All-to-all volume and expert-load accounting from routing maps (pure torch, no Megatron).

What a dispatcher sends for one token, given its routing-map row:
  * Megatron's stock alltoall dispatcher: one row per (token, expert) pair;
  * a rank-deduplicating dispatcher (`--moe-dedup-dispatch`, DeepEP's layout): one row per
    (token, destination EP rank) pair.
A row is *remote* when its destination EP rank is not the token's own, *inter-node* when the
destination's node differs. EP ranks are assumed consecutive within a node (EP is Megatron's
innermost group after TP), so node = ep_rank // ep_ranks_per_node. The combine all-to-all sends
the same rows back, so the byte counts here are one direction.

`dispatch_counts` returns flat sums (a 1-D float64 tensor, layout `COUNT_FIELDS` then the
per-expert loads) so that training can accumulate them on the device with no host sync and reduce
them across ranks in one all-reduce; `volume_from_counts` turns sums into per-token figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Union

import torch

from megatron_moe_ext.routing.topology import EPTopology

COUNT_FIELDS = (
    "tokens",
    "pair_rows", "pair_remote_rows", "pair_inter_node_rows",   # stock: (token, expert) pairs
    "rank_rows", "rank_remote_rows", "rank_inter_node_rows",   # dedup: (token, EP rank) pairs
)
NUM_FIELDS = len(COUNT_FIELDS)


def dispatch_counts(routing_map: torch.Tensor, *, ep_size: int, ep_ranks_per_node: int,
                    src_ep_rank: Union[int, torch.Tensor],
                    expert_to_rank: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sums of dispatched rows for a batch of tokens.

    Args:
        routing_map: BoolTensor[T, E], True where token t is sent to expert e.
        ep_size: number of EP ranks.
        ep_ranks_per_node: EP ranks that share a node (>= ep_size means one node).
        src_ep_rank: EP rank the tokens start on: an int for all, or LongTensor[T].
        expert_to_rank: LongTensor[E], EP rank of each expert (default: contiguous blocks).

    Returns:
        Float64Tensor[NUM_FIELDS + E]: `COUNT_FIELDS` sums, then tokens per expert.
    """
    T, E = routing_map.shape
    dev = routing_map.device
    if expert_to_rank is None:
        expert_to_rank = EPTopology(E, ep_size, ep_ranks_per_node).expert_to_rank(dev)
    rank_of_expert = torch.nn.functional.one_hot(expert_to_rank.to(dev), ep_size).double()  # [E, ep]
    hits = routing_map.double() @ rank_of_expert                                           # [T, ep]
    # fill kernels, not host-to-device copies of Python numbers: this runs in the training
    # forward (the metrics hook), which a CUDA graph may capture
    src = (torch.full((T,), src_ep_rank, dtype=torch.long, device=dev) if isinstance(src_ep_rank, int)
           else src_ep_rank.to(dev).expand(T))                                             # [T]
    ranks = torch.arange(ep_size, device=dev)
    remote = ranks.unsqueeze(0) != src.unsqueeze(1)                                        # [T, ep]
    inter = (ranks // ep_ranks_per_node).unsqueeze(0) != (src // ep_ranks_per_node).unsqueeze(1)
    touched = (hits > 0).double()
    sums = torch.stack([
        torch.full((), float(T), dtype=torch.float64, device=dev),
        hits.sum(), (hits * remote).sum(), (hits * inter).sum(),
        touched.sum(), (touched * remote).sum(), (touched * inter).sum(),
    ])
    return torch.cat([sums, routing_map.double().sum(0)])


@dataclass
class DispatchVolume:
    """Per-token dispatch figures (one direction) and the expert load."""

    tokens: int
    dedup: bool
    rows_per_token: float
    remote_rows_per_token: float
    inter_node_rows_per_token: float
    distinct_ranks_per_token: float
    stock_rows_per_token: float
    stock_remote_rows_per_token: float
    stock_inter_node_rows_per_token: float
    bytes_per_token: Optional[float]
    remote_bytes_per_token: Optional[float]
    inter_node_bytes_per_token: Optional[float]
    expert_load: List[float]  # share of routed (token, expert) pairs per expert, sums to 1
    load_cv: float            # coefficient of variation of tokens per expert (population std)

    def to_dict(self) -> Dict:
        return asdict(self)


def volume_from_counts(counts: torch.Tensor, *, dedup: bool, hidden_size: Optional[int] = None,
                       bytes_per_element: int = 2) -> DispatchVolume:
    """Per-token figures from summed `dispatch_counts` (any number of batches added together).

    `stock_*` are what Megatron's alltoall dispatcher sends for the same routing; the unprefixed
    figures are for the dispatcher in use (`dedup`)."""
    c = dict(zip(COUNT_FIELDS, counts[:NUM_FIELDS].double().cpu().tolist()))
    load = counts[NUM_FIELDS:].double().cpu()
    t = max(c["tokens"], 1.0)
    kind = "rank" if dedup else "pair"
    rows, remote, inter = (c[f"{kind}_rows"] / t, c[f"{kind}_remote_rows"] / t,
                           c[f"{kind}_inter_node_rows"] / t)
    row_bytes = None if hidden_size is None else hidden_size * bytes_per_element
    mean = load.mean()
    cv = float(load.std(unbiased=False) / mean) if mean > 0 else 0.0
    total = load.sum()
    return DispatchVolume(
        tokens=int(c["tokens"]), dedup=dedup,
        rows_per_token=rows, remote_rows_per_token=remote, inter_node_rows_per_token=inter,
        distinct_ranks_per_token=c["rank_rows"] / t,
        stock_rows_per_token=c["pair_rows"] / t,
        stock_remote_rows_per_token=c["pair_remote_rows"] / t,
        stock_inter_node_rows_per_token=c["pair_inter_node_rows"] / t,
        bytes_per_token=None if row_bytes is None else rows * row_bytes,
        remote_bytes_per_token=None if row_bytes is None else remote * row_bytes,
        inter_node_bytes_per_token=None if row_bytes is None else inter * row_bytes,
        expert_load=(load / total).tolist() if total > 0 else load.tolist(),
        load_cv=cv,
    )


def dispatch_volume(routing_map: torch.Tensor, *, ep_size: int, ep_ranks_per_node: int,
                    src_ep_rank: Union[int, torch.Tensor], dedup: bool,
                    expert_to_rank: Optional[torch.Tensor] = None,
                    hidden_size: Optional[int] = None, bytes_per_element: int = 2) -> DispatchVolume:
    """`dispatch_counts` then `volume_from_counts` for one routing map (see both)."""
    counts = dispatch_counts(routing_map, ep_size=ep_size, ep_ranks_per_node=ep_ranks_per_node,
                             src_ep_rank=src_ep_rank, expert_to_rank=expert_to_rank)
    return volume_from_counts(counts, dedup=dedup, hidden_size=hidden_size,
                              bytes_per_element=bytes_per_element)
