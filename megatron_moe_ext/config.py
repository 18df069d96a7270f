"""One place for every plugin option: `MoEExtConfig` and its validation.

The dataclass is flat on purpose (MegaBlocks' `Arguments` style): Megatron's argparse namespace is
flat, the flags map one-to-one onto fields, and a flat object is easy to pickle into checkpoints.
`args.py` adds the flags and builds this object from Megatron's args; validation lives here so the
same errors come out whether the config was built from flags, from Python, or from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from megatron_moe_ext.errors import UserError

ROUTER_POLICIES = ("topk", "c2r", "locmoe", "locmoe-plus")
SCMOE_CHOICES = ("off", "pos1", "pos2", "dgmoe")
SCMOE_SLOTS = ("auto", "1", "2", "3", "4")
EXPERT_BACKENDS = ("te", "torch", "sequential")


class MoEExtConfigError(UserError):
    """An invalid plugin option or combination; the message is one sentence naming the flag."""


@dataclass
class MoEExtConfig:
    """Plugin options. Field `x_y` is the command-line flag `--moe-x-y` unless noted.

    Megatron's own MoE options (`--num-experts`, `--moe-router-topk`, ...) stay in Megatron's
    `TransformerConfig`; this holds only what the plugin adds.
    """

    router_policy: str = "topk"
    """--moe-router-policy: how each token picks its experts."""

    ranks_per_node: Optional[int] = None
    """--moe-ranks-per-node: GPUs per node, for inter-node accounting and locality (None: the
    launcher's LOCAL_WORLD_SIZE, or 1 when unknown)."""

    ext_metrics: bool = True
    """--moe-ext-metrics / --no-moe-ext-metrics: log moe_ext/* communication and load metrics."""

    ext_metrics_bytes_per_element: int = 2
    """--moe-ext-metrics-bytes-per-element: element size of dispatched activations (2 for bf16)."""

    run_log: Optional[str] = None
    """--moe-ext-run-log FILE: append train/validation losses and moe_ext metrics as JSON lines
    (written by the last rank), for plots and summaries without parsing stdout."""

    save_routing_trace: Optional[str] = None
    """--save-routing-trace DIR: write each MoE layer's router logits, for `comm-volume --trace`."""

    routing_trace_interval: int = 0
    """--routing-trace-interval N: record a trace every N iterations (0: only the last one)."""

    routing_trace_max_tokens: int = 4096
    """--routing-trace-max-tokens: cap on tokens kept per layer and recorded step."""

    c2r_top_t: Optional[int] = None
    """--moe-c2r-top-t T: C2R partners per expert (default: experts per EP rank - 1, so a token's
    experts share its top-1's rank)."""

    c2r_plan: Optional[str] = None
    """--moe-c2r-plan PLAN.json: partner lists from `megatron-moe-ext plan-placement` (default:
    co-resident experts first, then the next ranks')."""

    c2r_warmup_steps: int = 0
    """--moe-c2r-warmup-steps W: train W iterations with plain top-k while profiling, then freeze
    partner lists among co-resident experts (saved in checkpoints)."""

    profile_collaboration: Optional[str] = None
    """--moe-profile-collaboration DIR: record every MoE layer's co-activation counts and write a
    collaboration profile to DIR when the run ends."""

    locmoe_mu: float = 0.01
    """--moe-locmoe-mu: coefficient of the LocMoE locality loss mu * KL(D_c || D_l)."""

    locmoe_eps: float = 1e-3
    """--moe-locmoe-eps: mass the localized distribution D_l leaves on remote experts."""

    locmoe_gate: str = "learned"
    """--moe-locmoe-gate {learned,grap}: GrAP-initialised learned gate, or the fixed GrAP gate."""

    locmoe_local_bias: float = 0.0
    """--moe-locmoe-local-bias B: add B to the selection scores of experts on the token's own
    node (selection only; an extension beyond the paper, see docs/locmoe.md)."""

    locmoe_local_bias_warmup_steps: int = 0
    """--moe-locmoe-local-bias-warmup-steps W: route without the local bias for the first W
    training iterations (the experts first learn from all tokens, as C2R's warm-up)."""

    locmoe_capacity: str = "off"
    """--moe-locmoe-capacity {off,bound}: use LocMoE's capacity lower bound as the expert
    capacity, clamped to --moe-expert-capacity-factor."""

    locmoe_plus_tau: float = 0.8
    """--moe-locmoe-plus-tau: LocMoE+ token-choice threshold; a token proposes its fewest top
    experts whose affinities reach tau x the sum of its positive affinities (at most k)."""

    locmoe_plus_reestimate_interval: int = 50
    """--moe-locmoe-plus-reestimate-interval N: re-estimate the LocMoE+ capacity every N
    iterations (0: keep Megatron's capacity)."""

    dedup_dispatch: bool = False
    """--moe-dedup-dispatch: send each token once per destination EP rank (not per expert)."""

    scmoe: str = "off"
    """--moe-scmoe {off,pos1,pos2,dgmoe}: shortcut-connected MoE layers (docs/scmoe.md)."""

    scmoe_expert_slot: str = "auto"
    """--moe-scmoe-expert-slot {auto,1,2,3,4}: where the routed experts' GEMMs run among the main
    stream's work (auto: time each slot over the first training steps and keep the fastest)."""

    expert_backend: Optional[str] = None
    """--moe-expert-backend {te,torch,sequential}: the routed experts' implementation (None:
    Megatron's choice from --moe-grouped-gemm and --transformer-impl)."""

    def __post_init__(self) -> None:
        self.validate()

    def resolved_ranks_per_node(self, world_size: Optional[int] = None) -> int:
        """Ranks per node, falling back to the launcher's LOCAL_WORLD_SIZE, then to the world size."""
        if self.ranks_per_node is not None:
            return self.ranks_per_node
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local is not None:
            return int(local)
        return world_size or 1

    def validate(self) -> None:
        """Raise MoEExtConfigError on the first invalid option; checks need nothing but this object."""
        if self.router_policy not in ROUTER_POLICIES:
            raise MoEExtConfigError(
                f"--moe-router-policy {self.router_policy!r} is unknown; "
                f"choose one of {', '.join(ROUTER_POLICIES)}."
            )
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise MoEExtConfigError(
                f"--moe-ranks-per-node must be a positive number of ranks, got {self.ranks_per_node}."
            )
        if self.ext_metrics_bytes_per_element not in (1, 2, 4):
            raise MoEExtConfigError(
                "--moe-ext-metrics-bytes-per-element must be 1 (fp8), 2 (bf16/fp16) or 4 (fp32), "
                f"got {self.ext_metrics_bytes_per_element}."
            )
        if self.routing_trace_interval < 0:
            raise MoEExtConfigError("--routing-trace-interval must be >= 0.")
        if self.routing_trace_max_tokens < 1:
            raise MoEExtConfigError("--routing-trace-max-tokens must be >= 1.")
        c2r_flags = [f for f, v in (("--moe-c2r-top-t", self.c2r_top_t is not None),
                                    ("--moe-c2r-plan", self.c2r_plan is not None),
                                    ("--moe-c2r-warmup-steps", self.c2r_warmup_steps != 0)) if v]
        if c2r_flags and self.router_policy != "c2r":
            raise MoEExtConfigError(f"{c2r_flags[0]} applies to the C2R router only; add "
                                    "--moe-router-policy c2r or drop the flag.")
        if self.profile_collaboration and os.path.exists(
                os.path.join(self.profile_collaboration, "profile.json")):
            raise MoEExtConfigError(
                f"--moe-profile-collaboration {self.profile_collaboration} already holds a "
                "profile.json; choose an empty folder so that no profile is overwritten.")
        loc_flags = [f for f, v in (("--moe-locmoe-mu", self.locmoe_mu != 0.01),
                                    ("--moe-locmoe-eps", self.locmoe_eps != 1e-3),
                                    ("--moe-locmoe-gate", self.locmoe_gate != "learned"),
                                    ("--moe-locmoe-capacity", self.locmoe_capacity != "off"),
                                    ("--moe-locmoe-local-bias", self.locmoe_local_bias != 0.0),
                                    ("--moe-locmoe-local-bias-warmup-steps",
                                     self.locmoe_local_bias_warmup_steps != 0)) if v]
        if loc_flags and self.router_policy not in ("locmoe", "locmoe-plus"):
            raise MoEExtConfigError(f"{loc_flags[0]} applies to the LocMoE routers only; add "
                                    "--moe-router-policy locmoe or drop the flag.")
        if self.locmoe_local_bias < 0:
            raise MoEExtConfigError("--moe-locmoe-local-bias must be >= 0 (it favours local experts).")
        if self.locmoe_local_bias_warmup_steps < 0:
            raise MoEExtConfigError("--moe-locmoe-local-bias-warmup-steps must be >= 0.")
        if self.locmoe_local_bias_warmup_steps and not self.locmoe_local_bias:
            raise MoEExtConfigError("--moe-locmoe-local-bias-warmup-steps delays the local bias; add "
                                    "--moe-locmoe-local-bias B or drop the flag.")
        if self.locmoe_mu < 0:
            raise MoEExtConfigError("--moe-locmoe-mu must be >= 0.")
        if not 0 < self.locmoe_eps < 1:
            raise MoEExtConfigError("--moe-locmoe-eps must be between 0 and 1 (exclusive).")
        plus_flags = [f for f, v in (("--moe-locmoe-plus-tau", self.locmoe_plus_tau != 0.8),
                                     ("--moe-locmoe-plus-reestimate-interval",
                                      self.locmoe_plus_reestimate_interval != 50)) if v]
        if plus_flags and self.router_policy != "locmoe-plus":
            raise MoEExtConfigError(f"{plus_flags[0]} applies to LocMoE+ only; add "
                                    "--moe-router-policy locmoe-plus or drop the flag.")
        if not 0 < self.locmoe_plus_tau <= 1:
            raise MoEExtConfigError("--moe-locmoe-plus-tau must be in (0, 1].")
        if self.locmoe_plus_reestimate_interval < 0:
            raise MoEExtConfigError("--moe-locmoe-plus-reestimate-interval must be >= 0.")
        if self.router_policy == "locmoe-plus" and self.locmoe_capacity != "off":
            raise MoEExtConfigError("--moe-locmoe-capacity is LocMoE's; LocMoE+ re-estimates its own "
                                    "capacity (--moe-locmoe-plus-reestimate-interval), so drop it.")
        if self.locmoe_capacity not in ("off", "bound"):
            raise MoEExtConfigError("--moe-locmoe-capacity must be off or bound.")
        if self.locmoe_gate not in ("learned", "grap"):
            raise MoEExtConfigError("--moe-locmoe-gate must be learned or grap.")
        if self.c2r_warmup_steps < 0:
            raise MoEExtConfigError("--moe-c2r-warmup-steps must be >= 0.")
        if self.c2r_plan and self.c2r_warmup_steps:
            raise MoEExtConfigError("--moe-c2r-plan and --moe-c2r-warmup-steps both set the partner "
                                    "lists; use one of them.")
        if self.scmoe not in SCMOE_CHOICES:
            raise MoEExtConfigError(f"--moe-scmoe must be one of {', '.join(SCMOE_CHOICES)}.")
        if str(self.scmoe_expert_slot) not in SCMOE_SLOTS:
            raise MoEExtConfigError(f"--moe-scmoe-expert-slot must be one of {', '.join(SCMOE_SLOTS)}.")
        if self.expert_backend is not None and self.expert_backend not in EXPERT_BACKENDS:
            raise MoEExtConfigError(f"--moe-expert-backend must be one of {', '.join(EXPERT_BACKENDS)}.")
        if self.scmoe == "off" and str(self.scmoe_expert_slot) != "auto":
            raise MoEExtConfigError("--moe-scmoe-expert-slot applies to ScMoE layers only; add "
                                    "--moe-scmoe pos1, pos2 or dgmoe or drop the flag.")
        if self.scmoe == "dgmoe" and self.router_policy in ("c2r", "locmoe-plus"):
            raise MoEExtConfigError(
                f"--moe-scmoe dgmoe excludes the previous pass's experts from the current pass, which "
                f"--moe-router-policy {self.router_policy} cannot honour; use topk or locmoe.")
        if (self.routing_trace_interval or self.routing_trace_max_tokens != 4096) and not self.save_routing_trace:
            raise MoEExtConfigError(
                "--routing-trace-interval and --routing-trace-max-tokens need --save-routing-trace DIR."
            )

    def validate_with_megatron(self, *, num_experts: Optional[int], topk: int, ep_size: int,
                               world_size: int, megatron_args: Optional[object] = None) -> None:
        """Checks that need Megatron's own settings (expert count, EP size, world size)."""
        rpn = self.resolved_ranks_per_node(world_size)
        if self.ranks_per_node is not None and ep_size % rpn != 0 and rpn % ep_size != 0:
            raise MoEExtConfigError(
                f"--moe-ranks-per-node {rpn} and --expert-model-parallel-size {ep_size} do not tile: "
                "one must divide the other so that EP ranks map onto whole nodes."
            )
        if num_experts is None and self.router_policy != "topk":
            raise MoEExtConfigError(
                f"--moe-router-policy {self.router_policy} needs an MoE model; set --num-experts."
            )
        if self.router_policy == "c2r":
            self._validate_c2r(num_experts, topk, ep_size)
        if self.router_policy in ("locmoe", "locmoe-plus"):
            self._validate_locmoe(num_experts, ep_size, world_size, megatron_args)
        if self.dedup_dispatch and megatron_args is not None:
            self._validate_dedup(megatron_args)
        if self.scmoe != "off" and megatron_args is not None:
            self._validate_scmoe(megatron_args, num_experts, topk)
        if self.expert_backend is not None and megatron_args is not None:
            self._validate_expert_backend(megatron_args)

    def _validate_expert_backend(self, a: object) -> None:
        get = lambda name, default=None: getattr(a, name, default)  # noqa: E731
        flag = f"--moe-expert-backend {self.expert_backend}"
        if self.expert_backend == "te":
            try:
                import transformer_engine  # noqa: F401
            except ImportError:
                raise MoEExtConfigError(f"{flag} needs Transformer Engine, which is not installed; "
                                        "install it or use --moe-expert-backend torch.") from None
            if not get("moe_grouped_gemm") or get("transformer_impl") != "transformer_engine":
                raise MoEExtConfigError(f"{flag} is Megatron's TEGroupedMLP; add --moe-grouped-gemm "
                                        "and --transformer-impl transformer_engine.")
        if self.expert_backend == "sequential" and get("moe_grouped_gemm"):
            raise MoEExtConfigError(f"{flag} is Megatron's SequentialMLP; drop --moe-grouped-gemm.")
        if self.expert_backend == "torch":
            if get("add_bias_linear", False):
                raise MoEExtConfigError(f"{flag} has no expert biases; add --disable-bias-linear.")
            if get("expert_tensor_parallel_size") not in (None, 1):
                raise MoEExtConfigError(f"{flag} does not shard experts over tensor-parallel ranks; "
                                        "set --expert-tensor-parallel-size 1.")
            if get("delay_wgrad_compute"):
                raise MoEExtConfigError(f"{flag} computes its weight gradients inside its backward, "
                                        "while --delay-wgrad-compute defers Transformer Engine's; drop "
                                        "--delay-wgrad-compute or use --moe-expert-backend te.")

    def _validate_scmoe(self, a: object, num_experts: Optional[int], topk: int) -> None:
        """The Megatron settings ScMoE/DGMoE layers need, checked before anything is built."""
        get = lambda name, default=None: getattr(a, name, default)  # noqa: E731
        flag = f"--moe-scmoe {self.scmoe}"
        if num_experts is None:
            raise MoEExtConfigError(f"{flag} needs an MoE model; set --num-experts.")
        if get("overlap_moe_expert_parallel_comm"):
            raise MoEExtConfigError(
                f"{flag} overlaps its own all-to-all inside the layer, while "
                "--overlap-moe-expert-parallel-comm replaces the layer's forward with per-module "
                "callables that would skip the shortcut; drop --overlap-moe-expert-parallel-comm.")
        for bad, what in ((get("moe_shared_expert_overlap"), "--moe-shared-expert-overlap (ScMoE schedules "
                           "the shared expert itself)"),
                          (get("moe_latent_size"), "--moe-latent-size"),
                          (get("overlap_dispatch_backward_with_experts_wgrad"),
                           "--overlap-dispatch-backward-with-experts-wgrad"),
                          (get("cuda_graph_impl", "none") not in (None, "none"), "--cuda-graph-impl")):
            if bad:
                raise MoEExtConfigError(f"{flag} does not support {what}; drop it.")
        shared = get("moe_shared_expert_intermediate_size")
        if self.scmoe == "dgmoe" and shared:
            raise MoEExtConfigError("--moe-scmoe dgmoe has no shared expert (its two gated passes match "
                                    "top-2 compute); drop --moe-shared-expert-intermediate-size.")
        if self.scmoe != "dgmoe" and not shared:
            raise MoEExtConfigError(f"{flag} adds a shared dense expert on the current stream; set "
                                    "--moe-shared-expert-intermediate-size (for example the expert FFN size).")
        if self.scmoe != "dgmoe" and not get("moe_shared_expert_gate"):
            raise MoEExtConfigError(f"{flag} scales the shared expert by the CG-1 sigmoid gate; add "
                                    "--moe-shared-expert-gate.")
        if (topk == 1 and get("moe_router_score_function", "softmax") == "softmax"
                and not get("moe_router_pre_softmax")):
            raise MoEExtConfigError(
                f"{flag} with top-1 routing needs --moe-router-pre-softmax: a softmax over one "
                "selected logit is exactly 1, and the gate would learn only from the aux loss.")
        num_layers = get("num_layers")
        if num_layers:
            try:
                scmoe_shortcut_sources(moe_layer_pattern(get("moe_layer_freq", 1), num_layers), self.scmoe)
            except ValueError as e:
                raise MoEExtConfigError(str(e)) from None
        problem = scmoe_recompute_problem(get("recompute_granularity"), get("recompute_method"),
                                          get("recompute_modules"))
        if problem:
            raise MoEExtConfigError(problem)

    def _validate_dedup(self, a: object) -> None:
        """What DedupAlltoAllTokenDispatcher does not support, caught before anything starts."""
        get = lambda name, default=None: getattr(a, name, default)  # noqa: E731
        if get("moe_token_dispatcher_type", "alltoall") != "alltoall":
            raise MoEExtConfigError("--moe-dedup-dispatch replaces the alltoall dispatcher; set "
                                    "--moe-token-dispatcher-type alltoall.")
        for bad, flag in ((get("expert_tensor_parallel_size") not in (None, 1),
                           "--expert-tensor-parallel-size > 1"),
                          (get("moe_pad_expert_input_to_capacity"), "--moe-pad-expert-input-to-capacity"),
                          (get("moe_router_padding_for_quantization"),
                           "--moe-router-padding-for-quantization"),
                          (get("moe_shared_expert_overlap"), "--moe-shared-expert-overlap")):
            if bad:
                raise MoEExtConfigError(f"--moe-dedup-dispatch does not support {flag} yet; drop one of them.")

    def _validate_locmoe(self, num_experts: int, ep_size: int, world_size: int, a) -> None:
        if self.router_policy == "locmoe-plus" and getattr(a, "moe_expert_capacity_factor", None) is None:
            raise MoEExtConfigError(
                "--moe-router-policy locmoe-plus gives tokens fewer than k experts, which Megatron's "
                "dispatchers handle only on the capacity path; set --moe-expert-capacity-factor "
                "(for example 1.0).")
        if self.locmoe_capacity == "bound" and getattr(a, "moe_expert_capacity_factor", None) is None:
            raise MoEExtConfigError(
                "--moe-locmoe-capacity bound drops tokens through Megatron's capacity path, which "
                "needs --moe-expert-capacity-factor (the upper clamp, for example 1.25).")
        hidden = getattr(a, "hidden_size", None)
        if hidden is not None and hidden % num_experts:
            raise MoEExtConfigError(
                f"--moe-router-policy locmoe starts its gate from GrAP, which needs --hidden-size "
                f"{hidden} divisible by --num-experts {num_experts}.")
        if self.resolved_ranks_per_node(world_size) >= ep_size * max(
                1, getattr(a, "tensor_model_parallel_size", 1) or 1) and self.locmoe_mu > 0:
            import warnings

            warnings.warn("--moe-router-policy locmoe: all EP ranks share one node "
                          "(--moe-ranks-per-node), so every expert is local and the locality loss "
                          "is constant.")

    def c2r_resolved_top_t(self, num_experts: int, ep_size: int) -> int:
        """T, defaulting to the co-resident partner count (experts per rank - 1)."""
        return self.c2r_top_t if self.c2r_top_t is not None else num_experts // ep_size - 1

    def _validate_c2r(self, num_experts: int, topk: int, ep_size: int) -> None:
        if self.c2r_plan:
            from megatron_moe_ext.files.plan import PlanError, load_plan

            try:
                plan = load_plan(self.c2r_plan, num_experts=num_experts, ep_size=ep_size, topk=topk)
            except PlanError as e:
                raise MoEExtConfigError(f"--moe-c2r-plan {e}") from None
            if self.c2r_top_t is not None and self.c2r_top_t != plan.top_t:
                raise MoEExtConfigError(f"--moe-c2r-top-t {self.c2r_top_t} differs from the plan's "
                                        f"top_t {plan.top_t} ({self.c2r_plan}); drop the flag.")
            return
        T = self.c2r_resolved_top_t(num_experts, ep_size)
        if T < topk - 1:
            raise MoEExtConfigError(
                f"--moe-c2r-top-t {T} is less than k-1 = {topk - 1} (--moe-router-topk {topk}); "
                "a token needs at least k-1 partners" + ("" if self.c2r_top_t is not None else
                ", and the default (experts per rank - 1) is too small here, so set it") + ".")
        if T > num_experts - 1:
            raise MoEExtConfigError(f"--moe-c2r-top-t {T} exceeds the {num_experts - 1} other experts.")
        per_rank = num_experts // ep_size
        if self.c2r_warmup_steps and T > per_rank - 1:
            raise MoEExtConfigError(
                f"--moe-c2r-warmup-steps derives partners among co-resident experts, at most "
                f"{per_rank - 1} here; lower --moe-c2r-top-t to {per_rank - 1} or less.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def moe_layer_pattern(moe_layer_freq, num_layers: int) -> list:
    """Megatron's MoE placement (gpt_layer_specs.py): 1 = MoE layer. An int N puts an MoE layer at
    every index divisible by N (layer 0 included); a list is the pattern itself."""
    if isinstance(moe_layer_freq, int):
        return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers:
        raise ValueError(f"--moe-layer-freq has {len(pattern)} entries for {num_layers} layers.")
    return pattern


def scmoe_recompute_problem(granularity: Optional[str], method: Optional[str], modules) -> Optional[str]:
    """The sentence refusing a recomputation setting that would separate an ScMoE shortcut from
    the layers it joins, or None. (Where chunk boundaries fall needs the stage's layer offsets:
    scmoe_spec checks that when the block is built.)"""
    if granularity == "full" and method != "uniform":
        return ("--moe-scmoe with full recomputation needs --recompute-method uniform, so that a "
                "dense layer and the MoE layer reading it are recomputed together.")
    if granularity == "selective" and set(modules or []) & {"moe", "mlp"}:
        return ("--moe-scmoe schedules the MoE itself, so --recompute-modules moe/mlp would not "
                "apply to its layers; drop them.")
    return None


def scmoe_shortcut_sources(pattern: list, mode: str) -> dict:
    """{MoE layer index: index of the dense layer whose post-attention stream its routed experts
    read, or None for its own input}. pos1 always reads the layer input; pos2 and dgmoe read the
    dense layer before (the first layer, with nothing before it, reads its input, the paper's
    "Pos-2 (L0 Pos-1)"); pos2 after another MoE layer has no dense block to read, an error, while
    dgmoe then reads its own input."""
    sources = {}
    for g, is_moe in enumerate(pattern):
        if not is_moe:
            continue
        if mode == "pos1" or g == 0:
            sources[g] = None
        elif not pattern[g - 1]:
            sources[g] = g - 1
        elif mode == "pos2":
            raise ValueError(
                f"--moe-scmoe pos2 pairs each MoE layer with the dense layer before it, but layers {g} "
                f"and {g + 1} are both MoE; use --moe-scmoe pos1 for every-layer MoE, or a "
                "--moe-layer-freq that alternates dense and MoE layers.")
        else:
            sources[g] = None
    return sources
