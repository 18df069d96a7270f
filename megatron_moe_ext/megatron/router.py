"""Routers for the plugin's policies, as TopKRouter subclasses that replace only the selection.

Megatron's `TopKRouter.routing()` does five things: z-loss, top-k selection, capacity/token
dropping, the load-balancing losses and the expert-bias counts. A policy changes the selection;
`PolicyRouter` keeps the other four exactly as Megatron does them, with one correction: the stock
router computes its balance losses on an independent plain top-k of the logits, which would
balance an assignment the policy never makes. Here they see the routing actually chosen.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter


class PolicyRouter(TopKRouter):
    """A TopKRouter whose expert selection is replaced.

    Subclasses implement `select_indices` (which experts, from the scores Megatron's own top-k
    would rank) and get Megatron's probability semantics for free: softmax before or after the
    top-k, sigmoid/sqrtsoftplus normalisation, the top-k scaling factor, expert bias used for
    selection only. Policies that also change the probabilities override `select`. Extra losses go
    in `extra_losses`. Constructor as TopKRouter's (MoELayer passes `config`, `pg_collection`,
    `is_mtp_layer` as keywords).
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        if self.routing_type in ("sinkhorn", "quantile_balancing"):
            raise ValueError(
                f"--moe-router-load-balancing-type {self.routing_type} selects experts itself and "
                f"cannot be combined with the plugin's routing policy {type(self).__name__}; use "
                "aux_loss, seq_aux_loss, global_aux_loss or none.")
        if config.moe_router_num_groups or config.moe_router_group_topk:
            raise ValueError(
                "--moe-router-num-groups/--moe-router-group-topk (group-limited routing) choose "
                f"experts themselves and cannot be combined with {type(self).__name__}; unset them.")
        # The EP group is not kept by Router; locality- and placement-aware policies need it.
        self.ep_group = getattr(pg_collection, "ep", None) if pg_collection is not None else None

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What Megatron's top-k ranks for this config, [T, E] float32: the logits (softmax after
        the top-k), the softmax (pre-softmax), or sigmoid/sqrtsoftplus scores plus the expert bias.
        Any monotone transform would select the same experts; this one keeps ties identical."""
        fn = self.score_function
        if fn == "softmax":
            if self.config.moe_router_pre_softmax:
                return torch.softmax(logits, dim=-1, dtype=torch.float32)
            return logits.float()
        scores = (torch.sigmoid(logits.float()) if fn == "sigmoid"
                  else torch.nn.functional.softplus(logits.float()).sqrt())
        if self.expert_bias is not None:
            scores = scores + self.expert_bias.float()
        return scores

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [T, E] (from `selection_scores`) -> chosen experts [T, topk] (long)."""
        raise NotImplementedError

    def select(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose experts. logits [T, E] (after z-loss) -> (probs [T, E], zero off the selection;
        routing_map [T, E] bool with exactly `self.topk` True per row)."""
        with torch.no_grad():
            indices = self.select_indices(self.selection_scores(logits))
        return topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, precomputed_indices=indices)

    def extra_losses(self, probs: torch.Tensor, logits: torch.Tensor,
                     padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Attach policy-specific auxiliary losses to `probs` (identity by default)."""
        return probs

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Megatron's routing() with `select` in place of the top-k (see router.py:741-832).

        logits [S, B, E]; padding_mask [S, B] (True = padding) -> probs, routing_map [S*B, E].
        """
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        probs, routing_map = self.select(logits)
        chosen_map = routing_map

        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        if self.training and torch.is_grad_enabled():
            if self.is_aux_loss_enabled():
                _, scores_for_aux = compute_routing_scores_for_aux_loss(
                    logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask)
                map_for_aux = chosen_map
                if padding_mask is not None:
                    map_for_aux = map_for_aux & (~padding_mask).unsqueeze(-1)
                with_pad = padding_mask is not None
                probs = self._apply_aux_loss(probs, scores_for_aux, map_for_aux,
                                             with_padding_mask=with_pad)
                probs = self._apply_seq_aux_loss(probs, scores_for_aux, map_for_aux, seq_length,
                                                 bsz, with_padding_mask=with_pad)
                probs = self._apply_global_aux_loss(probs, scores_for_aux, map_for_aux,
                                                    with_padding_mask=with_pad)
            probs = self.extra_losses(probs, logits, padding_mask)

        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map
