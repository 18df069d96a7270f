"""Routing policies for offline analysis (`comm-volume`): logits -> which experts each token uses.

Each policy is `fn(logits: Tensor[T, E], topk: int, ctx: PolicyContext) -> LongTensor[T, topk]`
(the chosen experts). It may declare its own command-line flags through `add_args`, whose values
arrive in `ctx.options`. Training uses the Megatron routers in `megatron/router.py`, which call
the same selection functions, so offline figures and training agree.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch


@dataclass
class PolicyContext:
    """What a policy may need besides the logits."""

    num_experts: int
    ep_size: int
    ep_ranks_per_node: int
    src_ep_rank: torch.Tensor            # LongTensor[T], the EP rank each token starts on
    options: Dict[str, object] = field(default_factory=dict)


@dataclass
class RoutingPolicy:
    name: str
    select: Callable[[torch.Tensor, int, PolicyContext], torch.Tensor]
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    help: str = ""


ROUTING_POLICIES: Dict[str, RoutingPolicy] = {}


def register_policy(name: str, *, add_args=None, help: str = ""):
    """Decorator registering `fn(logits, topk, ctx) -> LongTensor[T, topk]` under `name`."""

    def wrap(fn):
        ROUTING_POLICIES[name] = RoutingPolicy(name, fn, add_args, help)
        return fn

    return wrap


@register_policy("topk", help="plain top-k of the router logits (Megatron's TopKRouter)")
def topk_policy(logits: torch.Tensor, topk: int, ctx: PolicyContext) -> torch.Tensor:
    """The experts Megatron's softmax top-k router picks: the top-k logits. [T, E] -> [T, k]."""
    return torch.topk(logits, topk, dim=1).indices


def indices_to_map(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """LongTensor[T, k] of chosen experts -> BoolTensor[T, E] routing map."""
    rmap = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool, device=indices.device)
    return rmap.scatter_(1, indices, True)
