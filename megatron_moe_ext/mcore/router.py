"""Routers for the plugin's policies, as TopKRouter subclasses that replace only the selection.

Megatron's `TopKRouter.routing()` does five things: z-loss, top-k selection, capacity/token
dropping, the load-balancing losses and the expert-bias counts. A policy changes the selection;
`PolicyRouter` keeps the other four exactly as Megatron does them, with one correction: the stock
router computes its balance losses on an independent plain top-k of the logits, which would
balance an assignment the policy never makes. Here they see the routing actually chosen.
"""

from __future__ import annotations

import contextlib
import math
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
        self._excluded: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def excluding(self, experts: torch.Tensor):
        """Within the block, selection may not pick experts[t, e] == True (bool [T, E]); DGMoE's
        current pass uses it so that it never repeats an expert its previous pass chose."""
        self._excluded = experts
        try:
            yield
        finally:
            self._excluded = None

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

    def observe_selection(self, indices: torch.Tensor) -> None:
        """Called with the chosen experts [T, topk] of every training forward (no-op here)."""

    def capacity_factor(self, logits: torch.Tensor, routing_map: torch.Tensor):
        """Capacity factor for token dropping this step (None: dropless). Megatron's static
        `--moe-expert-capacity-factor` here; policies may lower it per step."""
        return self.config.moe_expert_capacity_factor

    def select(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose experts. logits [T, E] (after z-loss) -> (probs [T, E], zero off the selection;
        routing_map [T, E] bool with exactly `self.topk` True per row)."""
        training = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            scores = self.selection_scores(logits)
            if self._excluded is not None:
                scores = scores.masked_fill(self._excluded.reshape(scores.shape), float("-inf"))
            indices = self.select_indices(scores)
            if training:
                self.observe_selection(indices)
        return topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, precomputed_indices=indices)

    def extra_losses(self, probs: torch.Tensor, logits: torch.Tensor,
                     padding_mask: Optional[torch.Tensor],
                     scores_for_aux: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attach policy-specific auxiliary losses to `probs` (identity by default).
        scores_for_aux: Megatron's balance-loss scores [T, E] when a balance loss ran, else None."""
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

        capacity_factor = self.capacity_factor(logits, routing_map)
        if capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        if self.training and torch.is_grad_enabled():
            scores_for_aux = None
            if self.is_aux_loss_enabled():
                _, scores_for_aux = compute_routing_scores_for_aux_loss(
                    logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                    padding_mask=padding_mask)
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
            probs = self.extra_losses(probs, logits, padding_mask, scores_for_aux)

        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map


class TopKPolicyRouter(PolicyRouter):
    """Megatron's top-k as a PolicyRouter (same experts, probabilities and losses as TopKRouter),
    for layers that need `excluding` (DGMoE) with the plain top-k policy."""

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.topk(scores, self.topk, dim=1).indices


class C2RRouter(PolicyRouter):
    """Collaboration-constrained routing: top-1 free, the other k-1 among the top-1's partners.

    Partners ([E, T]) come from the plan file (`--moe-c2r-plan`, this layer's lists, indexed by
    physical slot), the online warm-up profile (`--moe-c2r-warmup-steps`: plain top-k while
    counting co-activation, then partners among co-resident experts, frozen), or the default
    lists (co-resident experts first). Only warm-up partners are learned state, so only then are
    they checkpointed (with the warm-up progress): a plan or default run rebuilds them from its
    flags, and can start from a checkpoint trained with plain top-k.
    Build it with `functools.partial(C2RRouter, ext_cfg=...)` as MoESubmodules.router.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        from megatron.core import parallel_state

        from megatron_moe_ext.config import MoEExtConfig
        from megatron_moe_ext.routing.collaboration import default_partner_lists

        self.ext_cfg = ext_cfg or MoEExtConfig(router_policy="c2r")
        E = config.num_moe_experts
        self.ep_size = (self.ep_group.size() if self.ep_group is not None
                        else parallel_state.get_expert_model_parallel_world_size())
        self.top_t = self._plan().top_t if self.ext_cfg.c2r_plan else \
            self.ext_cfg.c2r_resolved_top_t(E, self.ep_size)
        dev = self.weight.device
        warm = self.ext_cfg.c2r_warmup_steps > 0
        self.register_buffer("c2r_partners", default_partner_lists(E, self.ep_size, self.top_t).to(dev),
                             persistent=warm)
        # 1 while constrained; 0 during the warm-up (a [1] long tensor: checkpoint-friendly)
        self.register_buffer("c2r_active", torch.tensor([0 if warm else 1], device=dev),
                             persistent=warm)
        self.register_buffer("c2r_warmup_forwards", torch.zeros(1, dtype=torch.long, device=dev),
                             persistent=warm)
        self._coact = torch.zeros(E, E, dtype=torch.float64, device=dev) if warm else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if int(self.c2r_active.item()) == 1:
            self._coact = None  # resumed after the warm-up: stay constrained

    def _plan(self):
        from megatron_moe_ext.files.plan import load_plan

        if not hasattr(self, "_plan_cache"):
            self._plan_cache = load_plan(self.ext_cfg.c2r_plan, num_experts=self.config.num_moe_experts,
                                         ep_size=self.ep_size, topk=self.topk)
        return self._plan_cache

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        if self.ext_cfg.c2r_plan:
            plan = self._plan()
            if layer_number not in plan.partners:
                raise ValueError(f"{plan.path} has no partner lists for MoE layer {layer_number} "
                                 f"(it has layers {sorted(plan.partners)}).")
            self.c2r_partners.copy_(plan.partners[layer_number])

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        from megatron_moe_ext.routing.c2r import c2r_select

        if self._coact is None:  # constrained (no warm-up, or it is over)
            return c2r_select(scores, self.topk, self.c2r_partners)
        return torch.topk(scores, self.topk, dim=1).indices

    def observe_selection(self, indices: torch.Tensor) -> None:
        if self._coact is not None:
            self._warmup_step(indices)

    def _warmup_step(self, indices: torch.Tensor) -> None:
        """Count co-activation; after W iterations freeze co-resident partners (collective over
        the router's data-parallel group, reached by every rank at the same micro-batch)."""
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        from megatron_moe_ext.routing.collaboration import (
            coactivation_counts,
            partner_lists,
        )
        from megatron_moe_ext.routing.policies import indices_to_map

        E = self.config.num_moe_experts
        self._coact += coactivation_counts(indices_to_map(indices, E))
        self.c2r_warmup_forwards += 1
        if int(self.c2r_warmup_forwards.item()) < self.ext_cfg.c2r_warmup_steps * get_num_microbatches():
            return
        coact = self._coact
        if torch.distributed.is_initialized() and self.tp_dp_cp_group is not None:
            torch.distributed.all_reduce(coact, group=self.tp_dp_cp_group)
        expert_to_rank = torch.arange(E, device=coact.device) // (E // self.ep_size)
        partners = partner_lists(coact.cpu(), self.top_t, expert_to_rank=expert_to_rank.cpu(),
                                 co_resident_only=True)
        self.c2r_partners.copy_(partners)
        self.c2r_active.fill_(1)
        self._coact = None


class LocMoERouter(PolicyRouter):
    """LocMoE: top-k routing plus a locality loss toward experts on the token's own node.

    The loss (routing/locality.py) is mu * KL(D_c || D_l) per source rank, attached like
    Megatron's other auxiliary losses (recorded as "locality_loss"; its running mean is also
    reported as moe_ext/locality_kl). `--moe-locmoe-gate grap` freezes the gate to the paper's
    block-orthogonal GrAP weights; `learned` (default) starts from them and trains.
    Build with `functools.partial(LocMoERouter, ext_cfg=...)`.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        from megatron.core import parallel_state

        from megatron_moe_ext.config import MoEExtConfig
        from megatron_moe_ext.routing.locality import (
            grap_gate_weight,
            localized_distribution,
            node_local_expert_mask,
        )

        self.ext_cfg = ext_cfg or MoEExtConfig(router_policy="locmoe")
        E = config.num_moe_experts
        with torch.no_grad():
            self.weight.copy_(grap_gate_weight(E, config.hidden_size, self.weight.dtype))
        if self.ext_cfg.locmoe_gate == "grap":
            self.weight.requires_grad_(False)
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        tp = parallel_state.get_tensor_model_parallel_world_size()
        ep_rpn = max(1, self.ext_cfg.resolved_ranks_per_node(world) // max(1, tp))
        self.register_buffer("locality_mask", node_local_expert_mask(E, ep_size, ep_rank, ep_rpn).to(
            self.weight.device), persistent=False)
        self.locality_kl_sum = torch.zeros(2, dtype=torch.float32, device=self.weight.device)
        # log D_l, fixed by the placement: computed once, so the loss needs no host sync per step
        # (a plain attribute: Megatron's Float16Module would cast a buffer to bf16)
        self._log_d_l = torch.log(localized_distribution(self.locality_mask.cpu(), self.ext_cfg.locmoe_eps))
        # capacity lower bound (--moe-locmoe-capacity bound): EMA of the angle statistic delta,
        # and [sum of applied factors, count, clamped count] for logging
        self.register_buffer("locmoe_delta", torch.zeros(1, dtype=torch.float64), persistent=False)
        # training forwards seen, for --moe-locmoe-local-bias-warmup-steps (checkpointed with it)
        self.register_buffer("locmoe_bias_forwards", torch.zeros(1, dtype=torch.long, device=self.weight.device),
                             persistent=self.ext_cfg.locmoe_local_bias_warmup_steps > 0)
        self.capacity_stats = torch.zeros(3, dtype=torch.float64)
        self._clamp_warned = False
        self._last_input = None

    def forward(self, input, padding_mask=None):
        self._last_input = input  # the bound's angle statistic needs the hidden states
        try:
            return super().forward(input, padding_mask=padding_mask)
        finally:
            self._last_input = None

    def capacity_factor(self, logits, routing_map):
        """With --moe-locmoe-capacity bound: Theorem 1's lower bound on tokens per expert, from
        an EMA of delta = mean cosine between tokens and their chosen expert's gate vector,
        turned into a capacity factor and clamped to --moe-expert-capacity-factor."""
        cf = self.config.moe_expert_capacity_factor
        if self.ext_cfg.locmoe_capacity != "bound" or self._last_input is None:
            return cf
        from megatron_moe_ext.routing.locality import (
            capacity_factor_from_bound,
            capacity_lower_bound,
            chosen_expert_cosine,
        )

        with torch.no_grad():
            hidden = self._last_input.reshape(-1, self._last_input.shape[-1])
            delta = chosen_expert_cosine(hidden, self.weight, routing_map).mean().double()
            if torch.distributed.is_initialized() and self.tp_dp_cp_group is not None:
                # one capacity for every rank of the layer
                torch.distributed.all_reduce(delta, group=self.tp_dp_cp_group)
                delta /= torch.distributed.get_world_size(self.tp_dp_cp_group)
            first = bool(self.locmoe_delta.item() == 0)
            self.locmoe_delta.mul_(0.0 if first else 0.9).add_(delta.cpu() * (1.0 if first else 0.1))
            d = float(self.locmoe_delta.clamp(1e-6, 0.999).item())
        bound = capacity_lower_bound(d, self.config.hidden_size, self.config.num_moe_experts).beta_form
        factor, clamped = capacity_factor_from_bound(
            bound, num_tokens=routing_map.shape[0], topk=self.topk,
            num_experts=self.config.num_moe_experts, max_capacity_factor=cf)
        self.capacity_stats += torch.tensor([factor, 1.0, float(clamped)], dtype=torch.float64)
        if clamped and not self._clamp_warned:
            import warnings

            warnings.warn(f"LocMoE capacity bound for delta={d:.3f} ({bound:.3g} tokens per expert) "
                          f"exceeds --moe-expert-capacity-factor {cf}; clamped to it.")
            self._clamp_warned = True
        return factor

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.topk(scores, self.topk, dim=1).indices

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Megatron's selection scores plus `--moe-locmoe-local-bias` on this node's experts:
        the router knows which node its tokens are on, the loss alone cannot use that (see
        docs/locmoe.md). Selection only: probabilities stay the unbiased score function's."""
        scores = super().selection_scores(logits)
        bias = self.ext_cfg.locmoe_local_bias
        if not bias:
            return scores
        local = self.locality_mask.to(scores.dtype)
        warmup = self.ext_cfg.locmoe_local_bias_warmup_steps
        if warmup:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            # a device-side switch: no host sync per step
            local = local * (self.locmoe_bias_forwards >= warmup * get_num_microbatches()).to(scores.dtype)
        return scores + bias * local

    def observe_selection(self, indices: torch.Tensor) -> None:
        super().observe_selection(indices)
        if self.ext_cfg.locmoe_local_bias_warmup_steps:
            self.locmoe_bias_forwards += 1

    def extra_losses(self, probs, logits, padding_mask, scores_for_aux=None):
        from megatron_moe_ext.routing.locality import locality_kl

        mu = self.ext_cfg.locmoe_mu
        if not mu:
            return probs
        if scores_for_aux is not None:
            scores = scores_for_aux  # Megatron's balance-loss scores: the same function, computed once
        elif self.score_function == "softmax":
            scores = torch.softmax(logits.float(), dim=-1)
        else:  # the same normalized scores Megatron's balance loss uses
            scores = torch.sigmoid(logits.float())
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        valid = None if padding_mask is None else ~padding_mask
        if self._log_d_l.device != scores.device or self._log_d_l.dtype != scores.dtype:
            self._log_d_l = self._log_d_l.to(device=scores.device, dtype=scores.dtype)
        kl = locality_kl(scores, self._log_d_l, valid=valid)
        with torch.no_grad():
            # The router is built on the CPU and moved by Megatron's model.cuda(), which does not
            # move plain attributes: follow the loss's device (a buffer would be cast to bf16).
            if self.locality_kl_sum.device != kl.device:
                self.locality_kl_sum = self.locality_kl_sum.to(kl.device)
            self.locality_kl_sum[0] += kl.detach()
            self.locality_kl_sum[1] += 1
        return self.attach_and_log_load_balancing_loss(probs, mu, mu * kl, "locality_loss",
                                                       self.tp_cp_group)


class LocMoEPlusRouter(LocMoERouter):
    """LocMoE+ (expert-token resonance): token-choice top-l by affinity (l from the threshold
    rule), then each expert keeps its C highest-affinity tokens; tokens kept nowhere ride the
    residual path. C starts at Megatron's capacity (--moe-expert-capacity-factor, required: the
    dispatcher then sizes buffers from the routing map) and is re-estimated every N iterations
    from the affinity statistics (Remark 7's decreasing bound), never above that capacity.
    The locality loss and the GrAP gate are LocMoE's."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config, pg_collection, is_mtp_layer, ext_cfg=ext_cfg)
        self.resonance_capacity = None           # tokens per expert once re-estimated
        self.plus_forwards = 0
        # [dropped tokens, tokens, capacity sum, forwards] since the last report
        self.plus_stats = torch.zeros(4, dtype=torch.float64)

    def select(self, logits):
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        from megatron_moe_ext.routing.locality import (
            affinity,
            expert_choice_keep,
            resonance_capacity,
            token_choice_map,
        )

        T, E = logits.shape
        k = self.topk
        training = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            hidden = self._last_input.reshape(-1, self._last_input.shape[-1])
            aff = affinity(hidden, self.weight)                               # [T, E]
            order, proposed = token_choice_map(aff, k, self.ext_cfg.locmoe_plus_tau)
            base = math.ceil(T * k / E * self.config.moe_expert_capacity_factor)
            capacity = min(base, self.resonance_capacity or base)
            keep = expert_choice_keep(aff, proposed, capacity)
            if training:
                self.plus_forwards += 1
                interval = self.ext_cfg.locmoe_plus_reestimate_interval * get_num_microbatches()
                if interval and self.plus_forwards % interval == 0:
                    c = torch.tensor([resonance_capacity(aff.max(1).values, self.config.hidden_size, E)],
                                     dtype=torch.float64)
                    if torch.distributed.is_initialized() and self.tp_dp_cp_group is not None:
                        torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MIN,
                                                     group=self.tp_dp_cp_group)
                    self.resonance_capacity = int(min(c.item(), base))
                dropped = float((~keep.any(1)).sum())
                self.plus_stats += torch.tensor([dropped, T, capacity, 1.0], dtype=torch.float64)
        probs, _ = topk_routing_with_score_function(
            logits, k, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, precomputed_indices=order)
        return probs * keep, keep
