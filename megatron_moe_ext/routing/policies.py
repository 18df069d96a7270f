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
    layer: Optional[int] = None          # MoE layer number (traces), for per-layer plans


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


def _locmoe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local-bias", type=float, default=0.0, metavar="B",
                   help="locmoe: the run's --moe-locmoe-local-bias (traces hold the unbiased logits)")


@register_policy("locmoe", add_args=_locmoe_args,
                 help="LocMoE's selection: top-k of logits shaped by the locality loss, plus the "
                      "node-local bias with --local-bias (use it on a trace of a locmoe run)")
def locmoe_policy(logits: torch.Tensor, topk: int, ctx: PolicyContext) -> torch.Tensor:
    """LocMoE changes training (a loss), not the selection rule: top-k of the logits, with
    `--moe-locmoe-local-bias` B added to the token's node-local experts as LocMoERouter does.
    [T, E] -> [T, k]"""
    bias = float(ctx.options.get("local_bias") or 0.0)
    if not bias:
        return topk_policy(logits, topk, ctx)
    from megatron_moe_ext.routing.locality import node_local_expert_mask

    local = node_local_expert_mask(ctx.num_experts, ctx.ep_size, ctx.src_ep_rank.to(logits.device),
                                   ctx.ep_ranks_per_node)                              # [T, E]
    return torch.topk(logits + bias * local.to(logits.dtype), topk, dim=1).indices


def _c2r_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-t", type=int, default=None,
                   help="c2r: partners per expert (default: experts per rank - 1)")
    p.add_argument("--plan", default=None, help="c2r: partner lists from plan-placement")


@register_policy("c2r", add_args=_c2r_args,
                 help="collaboration-constrained: top-1 free, k-1 among its partners")
def c2r_policy(logits: torch.Tensor, topk: int, ctx: PolicyContext) -> torch.Tensor:
    """C2R with the plan's partners for ctx.layer (any layer of the plan for synthetic logits),
    or the default lists: co-resident experts first, then the next ranks'."""
    from megatron_moe_ext.routing.c2r import c2r_select
    from megatron_moe_ext.routing.collaboration import default_partner_lists

    plan_path = ctx.options.get("plan")
    if plan_path:
        from megatron_moe_ext.files.plan import load_plan

        plan = load_plan(plan_path, num_experts=ctx.num_experts, ep_size=ctx.ep_size, topk=topk)
        layer = ctx.layer if ctx.layer in plan.partners else min(plan.partners)
        partners = plan.partners[layer]
    else:
        top_t = ctx.options.get("top_t")
        top_t = ctx.num_experts // ctx.ep_size - 1 if top_t is None else top_t
        if top_t < topk - 1:
            raise ValueError(f"--top-t {top_t} is less than k-1 = {topk - 1}.")
        partners = default_partner_lists(ctx.num_experts, ctx.ep_size, top_t)
    return c2r_select(logits, topk, partners)


def indices_to_map(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """LongTensor[T, k] of chosen experts -> BoolTensor[T, E] routing map."""
    rmap = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool, device=indices.device)
    return rmap.scatter_(1, indices, True)
