"""What a router ranks when it selects experts, as Megatron's TopKRouter computes it.

Megatron's top-k (moe_utils.topk_routing_with_score_function) ranks the logits (softmax after
the top-k), the softmax (--moe-router-pre-softmax), or sigmoid / sqrt-softplus scores plus the
expert bias (--moe-router-enable-expert-bias, selection only). Training routers and the offline
`comm-volume` both rank these scores, so the experts chosen offline are the ones training chose.
"""

from __future__ import annotations

from typing import Optional

import torch


def selection_scores(logits: torch.Tensor, score_function: str = "softmax", pre_softmax: bool = False,
                     expert_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits [T, E] -> the scores Megatron's top-k ranks, [T, E] float32. Any monotone transform
    would select the same experts; this one keeps ties identical."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32) if pre_softmax else logits.float()
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    elif score_function == "sqrtsoftplus":
        scores = torch.nn.functional.softplus(logits.float()).sqrt()
    else:
        raise ValueError(f"unknown router score function {score_function!r}.")
    if expert_bias is not None:
        scores = scores + expert_bias.float().to(scores.device)
    return scores


def indices_to_map(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """LongTensor[T, k] of chosen experts -> BoolTensor[T, E] routing map."""
    rmap = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool, device=indices.device)
    return rmap.scatter_(1, indices, True)
