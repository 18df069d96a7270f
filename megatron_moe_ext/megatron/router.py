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
)
from megatron.core.transformer.moe.router import TopKRouter


class PolicyRouter(TopKRouter):
    """A TopKRouter whose expert selection is `select()`. Subclasses implement `select` and may
    add losses in `extra_losses`; constructor signature as TopKRouter's (MoELayer passes
    `config`, `pg_collection`, `is_mtp_layer` as keywords)."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        if self.routing_type in ("sinkhorn", "quantile_balancing"):
            raise ValueError(
                f"--moe-router-load-balancing-type {self.routing_type} selects experts itself and "
                f"cannot be combined with the plugin's routing policy {type(self).__name__}; use "
                "aux_loss, seq_aux_loss, global_aux_loss or none.")
        # The EP group is not kept by Router; locality- and placement-aware policies need it.
        self.ep_group = getattr(pg_collection, "ep", None) if pg_collection is not None else None

    def select(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose experts. logits [T, E] (after z-loss) -> (probs [T, E] float, zero off the
        selection; routing_map [T, E] bool with exactly `self.topk` True per row)."""
        raise NotImplementedError

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
