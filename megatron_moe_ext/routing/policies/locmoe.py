"""LocMoE's selection: top-k, plus `--moe-locmoe-local-bias` B on the token's node-local experts.

LocMoE changes training (a locality loss, routing/locality.py) more than the selection rule: its
router ranks Megatron's scores, with B added to the experts on the token's own node (selection
only; an extension beyond the paper, docs/locmoe.md). The router and the offline policy both call
`biased_scores`, so `comm-volume --policy locmoe --local-bias B` picks what training picked.
"""

from __future__ import annotations

from typing import Union

import torch

from megatron_moe_ext.routing.policies.topk import topk_select
from megatron_moe_ext.routing.scores import indices_to_map


def biased_scores(scores: torch.Tensor, local_mask: torch.Tensor,
                  bias: Union[float, torch.Tensor]) -> torch.Tensor:
    """scores [T, E] + bias on local experts (local_mask Bool[E] or [T, E]; bias a float or a
    one-element tensor, e.g. 0 during a warm-up, switched on the device without a host sync)."""
    return scores + bias * local_mask.to(scores.dtype)


def offline_route(scores: torch.Tensor, topk: int, ctx) -> torch.Tensor:
    bias = float(ctx.options.get("local_bias") or 0.0)
    if bias:
        scores = biased_scores(scores, ctx.topology.node_local_mask(ctx.src_ep_rank.to(scores.device)), bias)
    return indices_to_map(topk_select(scores, topk), scores.shape[1])
