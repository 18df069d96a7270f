"""Where experts live: `EPTopology`, the one description of experts over EP ranks over nodes.

Megatron places experts in contiguous blocks: with E experts over `ep_size` EP ranks, expert e
lives on EP rank e // (E / ep_size) (slot order; a C2R plan re-places experts by moving their
weights to other slots, so the slot -> rank map stays this one). EP ranks are grouped into nodes
of `ranks_per_node` consecutive EP ranks (>= ep_size: one node). Placement, locality, partner
defaults and dispatch accounting all take this object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class EPTopology:
    num_experts: int
    ep_size: int
    ranks_per_node: int  # EP ranks that share a node

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.num_experts < 1 or self.num_experts % self.ep_size:
            raise ValueError(f"{self.num_experts} experts do not divide over {self.ep_size} EP ranks.")
        if self.ranks_per_node < 1:
            raise ValueError(f"ranks per node must be positive, got {self.ranks_per_node}.")

    @classmethod
    def from_gpus(cls, num_experts: int, ep_size: int, gpus_per_node: int,
                  expert_tp_size: int = 1) -> "EPTopology":
        """From GPUs per node. Megatron's expert mesh orders ranks expert-TP fastest, then EP
        (then expert-DP, PP), so consecutive EP ranks are `expert_tp_size` GPUs apart, whatever
        the attention TP: a node holds gpus_per_node / expert_tp_size of them (at least one).
        With attention TP 2 and expert TP 1 the two TP ranks of a group are two EP ranks."""
        return cls(num_experts, ep_size, max(1, gpus_per_node // max(1, expert_tp_size)))

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def num_nodes(self) -> int:
        return max(1, -(-self.ep_size // self.ranks_per_node))

    def expert_to_rank(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """EP rank of every expert slot: LongTensor[E]."""
        return torch.arange(self.num_experts, device=device) // self.experts_per_rank

    def node_of(self, ep_rank: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """Node index of an EP rank (int) or of a tensor of EP ranks."""
        return ep_rank // self.ranks_per_node

    def node_local_mask(self, ep_rank: Union[int, torch.Tensor]) -> torch.Tensor:
        """Experts on the node of `ep_rank`: BoolTensor[E] for one rank, BoolTensor[T, E] for a
        LongTensor[T] of token source ranks."""
        rank = torch.as_tensor(ep_rank)
        return self.node_of(self.expert_to_rank(rank.device)) == self.node_of(rank).unsqueeze(-1)
