"""Megatron router adapters for the plugin's routing policies: TopKRouter subclasses that replace
only the selection.

Megatron's `TopKRouter.routing()` does five things: z-loss, top-k selection, capacity/token
dropping, the load-balancing losses and the expert-bias counts. A policy changes the selection;
`PolicyRouter` keeps the other four exactly as Megatron does them, with one correction: the stock
router computes its balance losses on an independent plain top-k of the logits, which would
balance an assignment the policy never makes. Here they see the routing actually chosen. The
selection math lives in `routing/policies/` (pure torch); these classes hold the state and the
Megatron glue.

State that changes what a router selects (C2R's frozen partners, LocMoE's bias switch and
capacity estimate, LocMoE+'s re-estimated capacity) advances only in `on_iteration_end`, once per
optimizer step (`mcore/iteration.py`), never inside a forward: a recomputed forward (activation
checkpointing runs it twice) and evaluation see exactly what the first training forward saw.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_moe_ext.kernels.router_gemm import gating_logits, tensor_core_gating_applies
from megatron_moe_ext.mcore.iteration import IterationState
from megatron_moe_ext.routing.scores import selection_scores
from megatron_moe_ext.routing.topology import EPTopology

# Statistics a router reports to the metrics recorder (`take_statistics`), one fixed layout so
# that every rank reduces a tensor of the same shape, whatever its layers' policies.
STAT_FIELDS = ("locality_kl_sum", "locality_kl_count", "capacity_factor_sum", "capacity_factor_count",
               "capacity_clamped", "dropped_tokens", "routed_tokens", "expert_capacity_sum",
               "expert_capacity_count")


def policy_router_problem(settings, policy: str) -> Optional[str]:
    """The sentence refusing a Megatron router setting that a PolicyRouter cannot honour, or None.
    `settings`: Megatron's args or TransformerConfig (the same attribute names)."""
    lb = getattr(settings, "moe_router_load_balancing_type", "aux_loss")
    for t in (lb if isinstance(lb, (list, tuple)) else [lb]):
        if t in ("sinkhorn", "quantile_balancing"):
            return (f"--moe-router-load-balancing-type {t} selects experts itself and cannot be "
                    f"combined with --moe-router-policy {policy}; use aux_loss, seq_aux_loss, "
                    "global_aux_loss or none.")
    if getattr(settings, "moe_router_num_groups", None) or getattr(settings, "moe_router_group_topk", None):
        return ("--moe-router-num-groups/--moe-router-group-topk (group-limited routing) choose experts "
                f"themselves and cannot be combined with --moe-router-policy {policy}; unset them.")
    if getattr(settings, "moe_enable_routing_replay", False) and policy == "locmoe-plus":
        return ("--moe-enable-routing-replay replays k experts per token, while --moe-router-policy "
                "locmoe-plus gives tokens fewer; drop one of them.")
    return None


class PolicyRouter(TopKRouter, IterationState):
    """A TopKRouter whose expert selection is replaced.

    Subclasses implement `select_indices` (which experts, from the scores Megatron's own top-k
    would rank) and get Megatron's probability semantics for free: softmax before or after the
    top-k, sigmoid/sqrtsoftplus normalisation, the top-k scaling factor, expert bias used for
    selection only, routing replay (`--moe-enable-routing-replay` records and replays the
    policy's choice). Policies that also change the probabilities override `select`. Extra losses
    go in `extra_losses`. Constructor as TopKRouter's (MoELayer passes `config`, `pg_collection`,
    `is_mtp_layer` as keywords).
    """

    policy = "topk"

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        problem = policy_router_problem(config, self.policy)
        if problem:
            raise ValueError(problem)
        from megatron_moe_ext.config import MoEExtConfig

        self.ext_cfg = ext_cfg or MoEExtConfig(router_policy=self.policy)
        # The EP group is not kept by Router; locality- and placement-aware policies need it.
        self.ep_group = pg_collection.ep
        self.ep_size, self.ep_rank = get_pg_size(self.ep_group), get_pg_rank(self.ep_group)
        self._excluded: Optional[torch.Tensor] = None

    def topology(self, ranks_per_node: Optional[int] = None) -> EPTopology:
        return EPTopology(self.config.num_moe_experts, self.ep_size, ranks_per_node or self.ep_size)

    @contextlib.contextmanager
    def excluding(self, experts: torch.Tensor):
        """Within the block, selection may not pick experts[t, e] == True (bool [T, E]); DGMoE's
        current pass uses it so that it never repeats an expert its previous pass chose."""
        self._excluded = experts
        try:
            yield
        finally:
            self._excluded = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """input [S, B, H] -> logits [S, B, E]. With --moe-router-kernel fused and
        --moe-router-dtype fp32 on BF16 weights, the GEMMs run on tensor cores
        (kernels/router_gemm.py: the same FP32 logits, gradients to BF16's rounding); otherwise
        Megatron's gating."""
        if self.ext_cfg.router_kernel == "fused" and tensor_core_gating_applies(
                input, self.weight, self.config.moe_router_dtype):
            return gating_logits(input, self.weight, self.bias)
        return super().gating(input)

    def is_training_forward(self) -> bool:
        """A forward that trains: counted once per micro-batch (the no-grad first pass of an
        activation-checkpointed forward and evaluation are not)."""
        return self.training and torch.is_grad_enabled()

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What Megatron's top-k ranks for this config, [T, E] float32 (routing/scores.py)."""
        return selection_scores(logits, self.score_function, self.config.moe_router_pre_softmax,
                                self.expert_bias)

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [T, E] (from `selection_scores`) -> chosen experts [T, topk] (long)."""
        raise NotImplementedError

    def observe_selection(self, indices: torch.Tensor) -> None:
        """Called with the chosen experts [T, topk] of every training forward (no-op here)."""

    def capacity_factor(self, logits: torch.Tensor, routing_map: torch.Tensor):
        """Capacity factor for token dropping this step (None: dropless). Megatron's static
        `--moe-expert-capacity-factor` here; policies may lower it per iteration."""
        return self.config.moe_expert_capacity_factor

    def take_statistics(self) -> torch.Tensor:
        """Float64[len(STAT_FIELDS)] sums since the last call, then reset (zeros here)."""
        return torch.zeros(len(STAT_FIELDS), dtype=torch.float64)

    def _indices(self, scores: torch.Tensor) -> torch.Tensor:
        """The policy's choice, through Megatron's routing replay when it is active."""
        if self.router_replay is None:
            return self.select_indices(scores)
        return self.router_replay.get_replay_topk(
            scores, self.topk, None, None,
            lambda s, k, *a, **kw: (None, self.select_indices(s)))[1]

    def select(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose experts. logits [T, E] (after z-loss) -> (probs [T, E], zero off the selection;
        routing_map [T, E] bool with exactly `self.topk` True per row)."""
        training = self.is_training_forward()  # (before no_grad hides it)
        with torch.no_grad():
            scores = self.selection_scores(logits)
            if self._excluded is not None:
                scores = scores.masked_fill(self._excluded.reshape(scores.shape), float("-inf"))
            indices = self._indices(scores)
            if training:
                self.observe_selection(indices)
        return topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, precomputed_indices=indices)

    def fused_selection(self) -> Optional[dict]:
        """The fused kernel's selection arguments for this forward ({} for plain top-k,
        {"partners": [E, T]} for C2R, {"bias": [E]} for a selection bias), or None where the
        policy's choice is not the kernel's (the default: Megatron's path)."""
        return None

    def _fused_args(self, padding_mask) -> Optional[dict]:
        """fused_selection() when --moe-router-kernel fused covers this forward, else None."""
        if self.ext_cfg.router_kernel != "fused":
            return None
        covered = (self.score_function == "softmax" and padding_mask is None and self._excluded is None
                   and self.router_replay is None and self.expert_bias is None
                   and self.get_aux_loss_coeff("seq_aux_loss") == 0
                   and self.get_aux_loss_coeff("global_aux_loss") == 0)
        return self.fused_selection() if covered else None

    def _apply_aux_loss_from_sums(self, probs: torch.Tensor, score_sums: torch.Tensor,
                                  tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Megatron's _apply_aux_loss (router.py) with the aux-loss scores' column sums [E] in
        place of the scores [T, E] (its switch loss only sums them over tokens), and the kernel's
        tokens_per_expert [E] of the chosen routing in place of routing_map.sum(0) (a strided
        reduction over [T, E]); pooled over the TP x CP group as Megatron's
        get_tokens_per_expert_and_token_count (moe_utils) does without a padding mask."""
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
        from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs
        tokens_per_expert = reduce_from_tensor_model_parallel_region(tokens_per_expert, self.tp_cp_group)
        local_tokens = probs.shape[0]
        total_tokens = local_tokens * self.tp_cp_group.size()
        aux_loss = switch_load_balancing_loss_func(
            probs=score_sums.unsqueeze(0), tokens_per_expert=tokens_per_expert, total_num_tokens=total_tokens,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=coeff, fused=False)
        return self.attach_and_log_load_balancing_loss(probs, coeff, aux_loss, "load_balancing_loss",
                                                       self.tp_cp_group, valid_token_count=local_tokens)

    def extra_losses(self, probs: torch.Tensor, logits: torch.Tensor,
                     padding_mask: Optional[torch.Tensor],
                     scores_for_aux: Optional[torch.Tensor] = None,
                     score_sums: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attach policy-specific auxiliary losses to `probs` (identity by default).
        scores_for_aux: Megatron's balance-loss scores [T, E] when a balance loss ran, else None;
        score_sums: the fused kernel's differentiable column sums [E] of the softmax scores over
        this forward's tokens (no padding mask on that path), else None."""
        return probs

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Megatron's routing() with `select` in place of the top-k (router.py:741-832).

        logits [S, B, E]; padding_mask [S, B] (True = padding) -> probs, routing_map [S*B, E].
        """
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        # 1. z-loss, as Megatron
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        # 2. the policy's selection and Megatron's probabilities at it (one kernel when fused)
        fused = self._fused_args(padding_mask)
        if fused is not None:
            from megatron_moe_ext.kernels.fused_router import fused_select

            probs, routing_map, indices, score_sums, chosen_counts = fused_select(
                logits, self.topk, pre_softmax=self.config.moe_router_pre_softmax,
                scaling_factor=self.config.moe_router_topk_scaling_factor, **fused)
            if self.is_training_forward():
                self.observe_selection(indices)
        else:
            probs, routing_map = self.select(logits)
        chosen_map = routing_map
        # 3. token dropping at the (policy's) capacity
        capacity_factor = self.capacity_factor(logits, routing_map)
        if capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        # 4. balance losses on the chosen routing, then the policy's own losses
        if self.training and torch.is_grad_enabled():
            scores_for_aux = None
            if fused is not None:   # only the switch loss here (_fused_args checked the others)
                probs = self._apply_aux_loss_from_sums(probs, score_sums, chosen_counts)
            elif self.is_aux_loss_enabled():
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
            probs = self.extra_losses(probs, logits, padding_mask, scores_for_aux,
                                      score_sums=score_sums if fused is not None else None)
        # 5. expert-bias counts, as Megatron
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map


class TopKPolicyRouter(PolicyRouter):
    """Megatron's top-k as a PolicyRouter (same experts, probabilities and losses as TopKRouter),
    for layers that need `excluding` (DGMoE) with the plain top-k policy."""

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        from megatron_moe_ext.routing.policies.topk import topk_select

        return topk_select(scores, self.topk)

    def fused_selection(self) -> Optional[dict]:
        return {}


def _data_parallel_sum(router: TopKRouter, t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the router's tensor x data x context parallel group (every rank holding this
    layer), in place; a no-op without torch.distributed."""
    if torch.distributed.is_initialized() and router.tp_dp_cp_group is not None:
        torch.distributed.all_reduce(t, group=router.tp_dp_cp_group)
    return t


class C2RRouter(PolicyRouter):
    """Collaboration-constrained routing: top-1 free, the other k-1 among the top-1's partners.

    Partners ([E, T]) come from the plan file (`--moe-c2r-plan`, this layer's lists, indexed by
    physical slot), the online warm-up profile (`--moe-c2r-warmup-steps`: plain top-k while
    counting co-activation, then partners among co-resident experts, frozen at the end of
    iteration W), or the default lists (co-resident experts first). Only warm-up partners are
    learned state, so only then are they checkpointed (with the switch): a plan or default run
    rebuilds them from its flags, and can start from a checkpoint trained with plain top-k.
    Build it with `functools.partial(C2RRouter, ext_cfg=...)` as MoESubmodules.router.
    """

    policy = "c2r"

    def topology(self, ranks_per_node: Optional[int] = None) -> EPTopology:
        # partners follow the placement of --moe-c2r-layout-ep (default: the run's EP size)
        ep = getattr(self, "layout_ep", self.ep_size)
        return EPTopology(self.config.num_moe_experts, ep, ranks_per_node or ep)

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        from megatron_moe_ext.config import MoEExtConfig
        from megatron_moe_ext.routing.collaboration import default_partner_lists
        from megatron_moe_ext.routing.policies.c2r import resolve_top_t

        self.ext_cfg = ext_cfg or MoEExtConfig(router_policy="c2r")
        layout = self.ext_cfg.c2r_layout_ep
        if layout is not None and (layout % self.ep_size or config.num_moe_experts % layout):
            raise ValueError(f"--moe-c2r-layout-ep {layout} must be a multiple of the run's EP size "
                             f"{self.ep_size} and divide --num-experts {config.num_moe_experts}.")
        self.layout_ep = layout or self.ep_size
        self._plan = None
        if self.ext_cfg.c2r_plan:
            from megatron_moe_ext.files.plan import load_plan

            self._plan = load_plan(self.ext_cfg.c2r_plan, num_experts=config.num_moe_experts,
                                   ep_size=self.layout_ep, topk=self.topk)
        self.top_t = self._plan.top_t if self._plan else resolve_top_t(
            self.ext_cfg.c2r_top_t, self.topology(), self.topk)
        dev = self.weight.device
        warm = self.ext_cfg.c2r_warmup_steps > 0
        self.register_buffer("c2r_partners", default_partner_lists(self.topology(), self.top_t).to(dev),
                             persistent=warm)
        # 1 while constrained; 0 during the warm-up (a [1] long tensor: checkpoint-friendly)
        self.register_buffer("c2r_active", torch.tensor([0 if warm else 1], device=dev),
                             persistent=warm)
        E = config.num_moe_experts
        self._coact = torch.zeros(E, E, dtype=torch.float64, device=dev) if warm else None
        self._warmup_checked = False  # checked at the first forward (one host read per load)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._warmup_checked = False

    def _warming_up(self) -> bool:
        """True during the warm-up. A checkpoint saved after it (c2r_active = 1) resumes
        constrained, however it was loaded (load_state_dict or Megatron's in-place dist load):
        checked once per load, at the first forward."""
        if self._coact is not None and not self._warmup_checked:
            self._warmup_checked = True
            if int(self.c2r_active.item()) == 1:
                self._coact = None
        return self._coact is not None

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        if self._plan is not None:
            if layer_number not in self._plan.partners:
                raise ValueError(f"{self._plan.path} has no partner lists for MoE layer {layer_number} "
                                 f"(it has layers {sorted(self._plan.partners)}).")
            self.c2r_partners.copy_(self._plan.partners[layer_number])

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        from megatron_moe_ext.routing.policies.c2r import c2r_select
        from megatron_moe_ext.routing.policies.topk import topk_select

        if not self._warming_up():  # constrained (no warm-up, or it is over)
            return c2r_select(scores, self.topk, self.c2r_partners)
        return topk_select(scores, self.topk)

    def fused_selection(self) -> Optional[dict]:
        return {} if self._warming_up() else {"partners": self.c2r_partners}

    def observe_selection(self, indices: torch.Tensor) -> None:
        if self._coact is not None:  # warm-up: count co-activation of the training forwards
            from megatron_moe_ext.routing.collaboration import coactivation_counts
            from megatron_moe_ext.routing.scores import indices_to_map

            counts = coactivation_counts(indices_to_map(indices, self.config.num_moe_experts))
            if self._coact.device != counts.device:
                # built on the CPU (Megatron initialises routers there); model.cuda() moves
                # buffers, not this plain attribute (a buffer would be cast by Float16Module)
                self._coact = self._coact.to(counts.device)
            self._coact += counts

    def on_iteration_end(self, iteration: int) -> None:
        """After iteration W of the warm-up: freeze co-resident partners from the counts summed
        over every rank holding this layer (collective; every such rank reaches it)."""
        if self._coact is None or iteration < self.ext_cfg.c2r_warmup_steps:
            return
        from megatron_moe_ext.routing.collaboration import partner_lists

        coact = _data_parallel_sum(self, self._coact)
        topo = self.topology()
        partners = partner_lists(coact.cpu(), self.top_t, expert_to_rank=topo.expert_to_rank(),
                                 co_resident_only=True)
        self.c2r_partners.copy_(partners)
        self.c2r_active.fill_(1)
        self._coact = None


class LocMoERouter(PolicyRouter):
    """LocMoE: top-k routing plus a locality loss toward experts on the token's own node.

    The loss (routing/locality.py) is mu * KL(D_c || D_l) per source rank, attached like
    Megatron's other auxiliary losses (recorded as "locality_loss"; its running mean is also
    reported as moe_ext/locality_kl). `--moe-locmoe-gate grap` freezes the gate to the paper's
    block-orthogonal GrAP weights; `learned` (default) starts from them and trains. With
    `--moe-locmoe-capacity bound`, the expert capacity of an iteration comes from an EMA of the
    angle statistic over the previous iterations (the first iteration uses its own batches).
    Build with `functools.partial(LocMoERouter, ext_cfg=...)`.
    """

    policy = "locmoe"

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        from megatron_moe_ext.config import MoEExtConfig
        from megatron_moe_ext.routing.locality import grap_gate_weight, localized_distribution

        self.ext_cfg = ext_cfg or MoEExtConfig(router_policy=self.policy)
        E = config.num_moe_experts
        with torch.no_grad():
            self.weight.copy_(grap_gate_weight(E, config.hidden_size, self.weight.dtype))
        if self.ext_cfg.locmoe_gate == "grap":
            self.weight.requires_grad_(False)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rpn = self.ext_cfg.resolved_ranks_per_node(world)
        dev = self.weight.device
        self.layout_ep = self.ext_cfg.locmoe_layout_ep
        if self.layout_ep:   # EP 1 emulating EP N: N source ranks, one mask row each
            if self.ep_size != 1 or E % self.layout_ep:
                raise ValueError(f"--moe-locmoe-layout-ep {self.layout_ep} needs EP 1 (it is {self.ep_size}) "
                                 f"and must divide --num-experts {E}.")
            topo = EPTopology(E, self.layout_ep, rpn)
            mask = topo.node_local_mask(torch.arange(self.layout_ep))                     # [N, E]
        else:
            topo = EPTopology.from_gpus(E, self.ep_size, rpn, get_pg_size(getattr(pg_collection, "expt_tp", None)))
            mask = topo.node_local_mask(self.ep_rank)                                     # [E]
        self.register_buffer("locality_mask", mask.to(dev), persistent=False)
        self._sources = None   # (tokens, micro-batch, device) -> LongTensor[T], cached
        self._stats = torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=dev)
        # log D_l, fixed by the placement: computed once, so the loss needs no host sync per step
        # (a plain attribute: Megatron's Float16Module would cast a buffer to bf16)
        self._log_d_l_master = torch.log(localized_distribution(self.locality_mask.cpu(), self.ext_cfg.locmoe_eps))
        self._log_d_l = self._log_d_l_master.to(device=dev, dtype=torch.float32)
        # the local bias is on from the end of iteration W (checkpointed with a warm-up)
        warm = self.ext_cfg.locmoe_local_bias_warmup_steps
        self.register_buffer("locmoe_bias_on", torch.tensor([0.0 if warm else 1.0], device=dev),
                             persistent=warm > 0)
        # --moe-locmoe-capacity bound: EMA of delta (0: none yet), this iteration's delta sums
        self.register_buffer("locmoe_delta", torch.zeros(1, dtype=torch.float64), persistent=False)
        self._delta_sum = torch.zeros(2, dtype=torch.float64)
        self._capacity = None  # (factor, clamped) for this iteration, from the EMA
        self._tokens = 0       # tokens of a training micro-batch on this rank
        self._clamp_warned = False
        self._last_input = None

    def forward(self, input, padding_mask=None):
        self._last_input = input  # the bound's angle statistic and LocMoE+'s affinity need it
        try:
            return super().forward(input, padding_mask=padding_mask)
        finally:
            self._last_input = None

    def token_sources(self, input: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Under --moe-locmoe-layout-ep N: the emulated source rank of each token of the router's
        input [S, B, H] (flattened s-major, as the router reads it): sample b of the micro-batch
        is on rank b // (B / N), as N data-parallel ranks would each hold B / N samples.
        LongTensor[S*B]; None without an emulated layout."""
        x = self._last_input if input is None else input
        if not self.layout_ep or x is None:
            return None
        if x.dim() != 3 or x.shape[1] % self.layout_ep:
            raise ValueError(f"--moe-locmoe-layout-ep {self.layout_ep} needs router inputs [S, B, H] with B "
                             f"a multiple of {self.layout_ep}; got {tuple(x.shape)} (--micro-batch-size).")
        S, B = x.shape[0], x.shape[1]
        key = (S * B, B, x.device)
        if self._sources is None or self._sources[0] != key:
            src = (torch.arange(S * B, device=x.device) % B) // (B // self.layout_ep)
            self._sources = (key, src)
        return self._sources[1]

    def _stat_device(self) -> None:
        if self._stats.device != self.weight.device:
            self._stats = self._stats.to(self.weight.device)  # follows model.cuda()

    def _stat(self, name: str, value) -> None:
        self._stat_device()
        self._stats[STAT_FIELDS.index(name)] += value

    def take_statistics(self) -> torch.Tensor:
        out = self._stats.cpu().clone()
        self._stats.zero_()
        return out

    def capacity_factor(self, logits, routing_map):
        """With --moe-locmoe-capacity bound: Theorem 1's lower bound on tokens per expert, for the
        EMA of delta = mean cosine between tokens and their chosen expert's gate vector, as a
        capacity factor clamped to --moe-expert-capacity-factor."""
        cf = self.config.moe_expert_capacity_factor
        if self.ext_cfg.locmoe_capacity != "bound" or self._last_input is None:
            return cf
        from megatron_moe_ext.routing.locality import chosen_expert_cosine

        training = self.is_training_forward()
        with torch.no_grad():
            hidden = self._last_input.reshape(-1, self._last_input.shape[-1])
            delta = chosen_expert_cosine(hidden, self.weight, routing_map).mean().double()
            if training:  # summed on the device: no host sync once an estimate exists
                if self._delta_sum.device != delta.device:
                    self._delta_sum = self._delta_sum.to(delta.device)
                self._delta_sum += torch.stack([delta, torch.ones_like(delta)])
                self._tokens = routing_map.shape[0]  # capacity factors are per token count
        if self._capacity is None:  # first iteration: no estimate yet, this batch's own delta
            factor, clamped = self._factor_for(float(delta), routing_map.shape[0])
        else:
            factor, clamped = self._capacity
        if training:
            self._stat("capacity_factor_sum", factor)
            self._stat("capacity_factor_count", 1.0)
            self._stat("capacity_clamped", float(clamped))
        return factor

    def _factor_for(self, delta: float, num_tokens: int):
        from megatron_moe_ext.routing.locality import capacity_factor_from_bound, capacity_lower_bound

        cf = self.config.moe_expert_capacity_factor
        d = min(max(delta, 1e-6), 0.999)
        bound = capacity_lower_bound(d, self.config.hidden_size, self.config.num_moe_experts).beta_form
        factor, clamped = capacity_factor_from_bound(
            bound, num_tokens=num_tokens, topk=self.topk, num_experts=self.config.num_moe_experts,
            max_capacity_factor=cf)
        if clamped and not self._clamp_warned:
            import warnings

            warnings.warn(f"LocMoE capacity bound for delta={d:.3f} ({bound:.3g} tokens per expert) "
                          f"exceeds --moe-expert-capacity-factor {cf}; clamped to it.")
            self._clamp_warned = True
        return factor, clamped

    def on_iteration_end(self, iteration: int) -> None:
        warm = self.ext_cfg.locmoe_local_bias_warmup_steps
        if warm and iteration >= warm:
            self.locmoe_bias_on.fill_(1.0)
        if self.ext_cfg.locmoe_capacity == "bound":
            # one estimate for every rank of the layer: the mean of its ranks' deltas
            sums = _data_parallel_sum(self, self._delta_sum.to(self.weight.device, copy=True)).cpu()
            self._delta_sum.zero_()
            if sums[1] > 0:
                delta = sums[0] / sums[1]
                first = bool(self.locmoe_delta.item() == 0)
                self.locmoe_delta.mul_(0.0 if first else 0.9).add_(delta * (1.0 if first else 0.1))
            if self.locmoe_delta.item() > 0 and self._tokens:
                self._capacity = self._factor_for(float(self.locmoe_delta.item()), self._tokens)

    def select_indices(self, scores: torch.Tensor) -> torch.Tensor:
        from megatron_moe_ext.routing.policies.topk import topk_select

        return topk_select(scores, self.topk)

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Megatron's selection scores plus `--moe-locmoe-local-bias` on this node's experts
        (routing/policies/locmoe.py): the router knows which node its tokens are on, the loss
        alone cannot use that (docs/locmoe.md). Selection only: probabilities stay unbiased."""
        from megatron_moe_ext.routing.policies.locmoe import biased_scores

        scores = super().selection_scores(logits)
        bias = self.ext_cfg.locmoe_local_bias
        if not bias:
            return scores
        src = self.token_sources()
        mask = self.locality_mask if src is None else self.locality_mask[src]   # [E] or [T, E]
        # a device-side switch: no host sync per step
        return biased_scores(scores, mask, bias * self.locmoe_bias_on.to(scores.dtype))

    def fused_selection(self) -> Optional[dict]:
        if self.layout_ep:   # a bias per token (its emulated node): Megatron's path
            return None
        bias = self.ext_cfg.locmoe_local_bias
        if not bias:
            return {}
        return {"bias": self.locality_mask.float() * (bias * self.locmoe_bias_on.float())}

    def extra_losses(self, probs, logits, padding_mask, scores_for_aux=None, score_sums=None):
        mu = self.ext_cfg.locmoe_mu
        if not mu:
            return probs
        loss = self._locality_loss(mu, logits, padding_mask, scores_for_aux, score_sums)
        return self.attach_and_log_load_balancing_loss(probs, mu, loss, "locality_loss",
                                                       self.tp_cp_group)

    def _locality_loss(self, mu, logits, padding_mask, scores_for_aux, score_sums) -> torch.Tensor:
        """mu * KL(D_c || D_l) of this forward's tokens, from the cheapest scores at hand, with
        the KL added to the statistics."""
        pool = self._pool_over_tp_shards()
        if (score_sums is not None and pool is None and self.score_function == "softmax"
                and self.token_sources() is None):
            # the fused kernel summed the same softmax scores: D_c without another [T, E] pass,
            # the loss and the statistics in one more kernel (kernels/locality_loss.py)
            from megatron_moe_ext.kernels.locality_loss import scaled_locality_kl

            self._stat_device()
            return scaled_locality_kl(score_sums, logits.shape[0], self._log_d_l_like(score_sums), mu,
                                      stats=self._stats, stat_slots=(STAT_FIELDS.index("locality_kl_sum"),
                                                                     STAT_FIELDS.index("locality_kl_count")))
        kl = self._locality_kl(logits, padding_mask, scores_for_aux, score_sums, pool)
        with torch.no_grad():
            self._stat("locality_kl_sum", kl.detach().double())
            self._stat("locality_kl_count", 1.0)
        return mu * kl

    def _locality_kl(self, logits, padding_mask, scores_for_aux, score_sums, pool) -> torch.Tensor:
        """KL(D_c || D_l) of this forward's tokens in plain torch."""
        from megatron_moe_ext.routing.locality import locality_kl, locality_kl_from_sums

        if score_sums is not None and self.score_function == "softmax" and self.token_sources() is None:
            return locality_kl_from_sums(score_sums, score_sums.new_full((1,), logits.shape[0]),
                                         self._log_d_l_like(score_sums), pool=pool)
        if scores_for_aux is not None:
            scores = scores_for_aux  # Megatron's balance-loss scores: the same function, computed once
        elif self.score_function == "softmax":
            scores = torch.softmax(logits.float(), dim=-1)
        else:  # the same normalized scores Megatron's balance loss uses
            scores = torch.sigmoid(logits.float())
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        valid = None if padding_mask is None else ~padding_mask
        return locality_kl(scores, self._log_d_l_like(scores), valid=valid, pool=pool,
                           sources=self.token_sources())

    def _log_d_l_like(self, t: torch.Tensor) -> torch.Tensor:
        """log D_l on t's device and dtype (float32 on the router's device from construction;
        after a later `.cuda()` moved once from the float64 master and kept): a host-to-device
        copy per forward would be a stall, and one a CUDA graph cannot capture."""
        if self._log_d_l.device != t.device or self._log_d_l.dtype != t.dtype:
            self._log_d_l = self._log_d_l_master.to(device=t.device, dtype=t.dtype)
        return self._log_d_l

    def _pool_over_tp_shards(self):
        """Under sequence parallelism each TP (x CP) rank routes a shard of the micro-batch; D_c is
        the whole micro-batch's, as at TP 1 (Megatron pools its balance-loss counts over the same
        group). Its ranks share a node (checked at parsing), hence one D_l."""
        if get_pg_size(self.tp_cp_group) == 1:
            return None
        from megatron.core.tensor_parallel.mappings import (
            reduce_from_tensor_model_parallel_region,
        )

        return functools.partial(reduce_from_tensor_model_parallel_region, group=self.tp_cp_group)


class LocMoEPlusRouter(LocMoERouter):
    """LocMoE+ (expert-token resonance, routing/policies/locmoe_plus.py): token-choice top-l by
    affinity, then each expert keeps its C highest-affinity tokens; tokens kept nowhere ride the
    residual path. C starts at Megatron's capacity (--moe-expert-capacity-factor, required: the
    dispatcher then sizes buffers from the routing map) and is re-estimated at the end of every
    N-th iteration from the last training micro-batch's affinities (Remark 7's decreasing bound),
    never above that capacity. The locality loss and the GrAP gate are LocMoE's."""

    policy = "locmoe-plus"

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, ext_cfg=None) -> None:
        super().__init__(config, pg_collection, is_mtp_layer, ext_cfg=ext_cfg)
        self.resonance_capacity = None   # tokens per expert once re-estimated
        self._last_aff_max = None        # [T] best affinity per token, last training forward

    def fused_selection(self) -> Optional[dict]:
        return None   # its own token and expert choice

    def select(self, logits):
        from megatron_moe_ext.routing.locality import affinity
        from megatron_moe_ext.routing.policies.locmoe_plus import base_capacity, resonance_route

        T, E = logits.shape
        k = self.topk
        training = self.is_training_forward()
        with torch.no_grad():
            hidden = self._last_input.reshape(-1, self._last_input.shape[-1])
            aff = affinity(hidden, self.weight)                               # [T, E]
            base = base_capacity(T, k, E, self.config.moe_expert_capacity_factor)
            capacity = min(base, self.resonance_capacity or base)
            order, keep = resonance_route(aff, k, self.ext_cfg.locmoe_plus_tau, capacity)
            if training:
                self._last_aff_max = aff.max(1).values
                self._stat("dropped_tokens", (~keep.any(1)).sum().double())
                self._stat("routed_tokens", float(T))
                self._stat("expert_capacity_sum", float(capacity))
                self._stat("expert_capacity_count", 1.0)
        probs, _ = topk_routing_with_score_function(
            logits, k, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, precomputed_indices=order)
        return probs * keep, keep

    def on_iteration_end(self, iteration: int) -> None:
        super().on_iteration_end(iteration)
        interval = self.ext_cfg.locmoe_plus_reestimate_interval
        if not interval or iteration % interval or self._last_aff_max is None:
            return
        from megatron_moe_ext.routing.locality import resonance_capacity
        from megatron_moe_ext.routing.policies.locmoe_plus import base_capacity

        T = self._last_aff_max.shape[0]
        E = self.config.num_moe_experts
        c = torch.tensor([resonance_capacity(self._last_aff_max, self.config.hidden_size, E)],
                         dtype=torch.float64, device=self.weight.device)
        if torch.distributed.is_initialized() and self.tp_dp_cp_group is not None:
            torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MIN, group=self.tp_dp_cp_group)
        base = base_capacity(T, self.topk, E, self.config.moe_expert_capacity_factor)
        self.resonance_capacity = int(min(c.item(), base))
