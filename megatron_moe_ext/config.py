"""One place for every plugin option: `MoEExtConfig`, its flags and its validation.

The dataclass is flat on purpose (MegaBlocks' `Arguments` style): Megatron's argparse namespace is
flat, the flags map one-to-one onto fields, and a flat object is easy to pickle into checkpoints.
Each field's docstring is its `--help` text and its metadata says which routing policy it belongs
to, so `args.py` generates the flags from this class (Megatron's `ArgumentGroupFactory`) and the
"applies to X only" checks come from the same place. Validation here is pure: no file I/O and no
Megatron settings (those checks live beside the adapters that need them, called from `args.py`).
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_moe_ext.errors import UserError
from megatron_moe_ext.routing.policies import POLICY_NAMES

SCMOE_CHOICES = ("off", "pos1", "pos2", "dgmoe")
SCMOE_SLOTS = ("auto", "1", "2", "3", "4")
EXPERT_BACKENDS = ("te", "torch", "sequential")


class MoEExtConfigError(UserError):
    """An invalid plugin option or combination; the message is one sentence naming the flag."""


def _opt(default, *, attr: Optional[str] = None, policies: tuple = (), **argparse_meta):
    """A config field. attr: Megatron's args attribute (default `moe_<field>`), whose flag is
    `--attr-with-dashes`; policies: the routing policies the option applies to (empty: all);
    argparse_meta: extra `add_argument` keywords (choices, metavar, ...)."""
    return field(default=default, metadata={"attr": attr, "policies": policies,
                                            "argparse_meta": argparse_meta})


def flag_attr(f: dataclasses.Field) -> str:
    """Megatron's args attribute of config field `f` (e.g. moe_router_policy)."""
    return f.metadata.get("attr") or "moe_" + f.name


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of config field `f` (e.g. --moe-router-policy)."""
    return "--" + flag_attr(f).replace("_", "-")


_LOCMOE = ("locmoe", "locmoe-plus")


@dataclass
class MoEExtConfig:
    """Options of megatron-moe-ext (Megatron's own MoE options stay in its TransformerConfig)."""

    router_policy: str = _opt("topk", choices=POLICY_NAMES)
    """Routing policy of every MoE layer: topk (Megatron's TopKRouter), c2r
    (collaboration-constrained), locmoe, locmoe-plus (locality-aware)."""

    router_kernel: Literal["megatron", "fused"] = _opt("megatron")
    """The router's selection: Megatron's routing functions, or fused: one Triton kernel each way
    for the softmax score, the policy's choice (top-k, C2R, LocMoE's bias), the probabilities and
    the aux-loss statistics (kernels/fused_router.py); with --moe-router-dtype fp32 and BF16
    weights, the gating GEMM on tensor cores too (kernels/router_gemm.py). Refused at parsing with what it never
    covers (another score function, expert bias, sequence/global aux losses, LocMoE+, an emulated
    LocMoE layout); padding masks, routing replay and DGMoE's exclusions take Megatron's path
    for that forward."""

    ranks_per_node: Optional[int] = _opt(None)
    """GPUs per node, for inter-node accounting and locality (default: LOCAL_WORLD_SIZE from the
    launcher)."""

    ext_metrics: bool = _opt(True)
    """Log moe_ext/* metrics: all-to-all rows and bytes per token (remote, inter-node), distinct
    destination ranks, per-expert load and its CV."""

    ext_metrics_bytes_per_element: int = _opt(2)
    """Bytes per element of dispatched activations for the byte counts (1 = fp8, 2 = bf16, 4 = fp32)."""

    run_log: Optional[str] = _opt(None, attr="moe_ext_run_log", metavar="FILE")
    """Append train/validation losses and moe_ext metrics to FILE as JSON lines (written by the
    last rank)."""

    save_routing_trace: Optional[str] = _opt(None, attr="save_routing_trace", metavar="DIR")
    """Write the router logits of every MoE layer to DIR (routing_trace_*.pt) for
    `megatron-moe-ext comm-volume --trace`."""

    routing_trace_interval: int = _opt(0, attr="routing_trace_interval")
    """Record a routing trace every N iterations (0: only at the last iteration)."""

    routing_trace_max_tokens: int = _opt(4096, attr="routing_trace_max_tokens")
    """Keep at most this many tokens per layer in each recorded trace."""

    c2r_top_t: Optional[int] = _opt(None, policies=("c2r",), metavar="T")
    """C2R: partners per expert among which the k-1 non-top-1 experts are chosen (default:
    experts per EP rank - 1, which keeps a token on one rank)."""

    c2r_plan: Optional[str] = _opt(None, policies=("c2r",), metavar="PLAN.json")
    """C2R: partner lists from `megatron-moe-ext plan-placement`."""

    c2r_warmup_steps: int = _opt(0, policies=("c2r",), metavar="W")
    """C2R from scratch: plain top-k for W iterations while profiling, then partners among
    co-resident experts, frozen and checkpointed."""

    c2r_layout_ep: Optional[int] = _opt(None, policies=("c2r",), metavar="N")
    """C2R: the expert-parallel size whose placement the constraint follows (default: the run's).
    A one-GPU study emulating EP N: co-resident partners, the default T and a plan are those of
    EP N, while the run itself has EP 1 (or any EP dividing N)."""

    profile_collaboration: Optional[str] = _opt(None, metavar="DIR")
    """Record expert co-activation of every MoE layer and write a collaboration profile to DIR at
    the end of the run (see `megatron-moe-ext profile`)."""

    locmoe_mu: float = _opt(0.01, policies=_LOCMOE)
    """LocMoE: coefficient of the locality loss mu * KL(D_c || D_l)."""

    locmoe_eps: float = _opt(1e-3, policies=_LOCMOE)
    """LocMoE: mass the fully localized distribution leaves on remote experts."""

    locmoe_gate: Literal["learned", "grap"] = _opt("learned", policies=_LOCMOE)
    """LocMoE: learned gate initialised to GrAP, or the fixed GrAP gate."""

    locmoe_local_bias: float = _opt(0.0, policies=_LOCMOE, metavar="B")
    """LocMoE: add B to the selection scores of experts on the token's own node (selection only;
    beyond the paper, docs/locmoe.md)."""

    locmoe_local_bias_warmup_steps: int = _opt(0, policies=_LOCMOE, metavar="W")
    """LocMoE: no local bias for the first W training iterations, then B."""

    locmoe_layout_ep: Optional[int] = _opt(None, policies=_LOCMOE, metavar="N")
    """LocMoE at EP 1 emulating EP N (a one-GPU study): each micro-batch's samples are split
    evenly over N source ranks, as N data-parallel ranks would hold them, and the locality loss
    and local bias follow EP N's placement, with --moe-ranks-per-node counting EP N's ranks per
    node. Every expert stays on the one GPU: nothing is sent differently."""

    locmoe_capacity: Literal["off", "bound"] = _opt("off", policies=("locmoe",))
    """LocMoE: expert capacity from the paper's lower bound (re-estimated every iteration),
    clamped to --moe-expert-capacity-factor."""

    locmoe_plus_tau: float = _opt(0.8, policies=("locmoe-plus",))
    """LocMoE+: a token proposes its fewest top experts whose affinities reach tau x its
    positive affinity sum (at most k)."""

    locmoe_plus_reestimate_interval: int = _opt(50, policies=("locmoe-plus",), metavar="N")
    """LocMoE+: re-estimate the expert capacity every N iterations (0: never)."""

    dedup_dispatch: bool = _opt(False)
    """Send each token once per destination EP rank instead of once per expert."""

    ep1_host_splits: bool = _opt(False)
    """On one EP rank with --moe-expert-backend torch, keep Megatron's dispatcher, which copies the
    tokens per expert to the host and waits for them in every MoE layer, instead of the plugin's
    device-splits dispatcher (the same function up to float rounding, no host wait); for comparisons."""

    expert_backend: Optional[str] = _opt(None, choices=EXPERT_BACKENDS)
    """Routed experts: te (Megatron's TEGroupedMLP), torch (the plugin's torch._grouped_mm
    experts, FP8 GEMMs under --fp8-format; no TE needed), sequential (Megatron's SequentialMLP).
    Default: Megatron's choice."""

    scmoe: str = _opt("off", choices=SCMOE_CHOICES)
    """Shortcut-connected MoE: the routed experts read the previous block's representation
    (pos2: its post-attention stream, for dense/MoE alternation; pos1: its output, for every-layer
    MoE) beside a gated shared expert, or dgmoe: two top-k passes of one expert set on the previous
    and current streams."""

    scmoe_expert_slot: str = _opt("auto", choices=SCMOE_SLOTS)
    """ScMoE: main-stream point of the routed experts' GEMMs (1: before block l's MLP, 2: before
    block l+1's attention, 3: after it, 4: after the shared expert; auto: time them over the first
    steps and keep the fastest)."""

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
        """Raise MoEExtConfigError on the first invalid option; pure: reads nothing but this object."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        flag = {name: flag_name(f) for name, f in fields.items()}
        for name, f in fields.items():
            value = getattr(self, name)
            choices = f.metadata["argparse_meta"].get("choices") or _literal_choices(f)
            if choices and value is not None and value not in choices:
                raise MoEExtConfigError(f"{flag[name]} {value!r} is not one of {', '.join(map(str, choices))}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise MoEExtConfigError(f"{flag[name]} must be a finite number, got {value}.")
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise MoEExtConfigError(f"{flag[name]} must be >= 0, got {value}.")
            owners = f.metadata["policies"]
            if owners and value != f.default and self.router_policy not in owners:
                raise MoEExtConfigError(
                    f"{flag[name]} applies to --moe-router-policy {' or '.join(owners)} only; add "
                    f"--moe-router-policy {owners[0]} or drop the flag.")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise MoEExtConfigError(
                f"--moe-ranks-per-node must be a positive number of ranks, got {self.ranks_per_node}.")
        if self.ext_metrics_bytes_per_element not in (1, 2, 4):
            raise MoEExtConfigError(
                "--moe-ext-metrics-bytes-per-element must be 1 (fp8), 2 (bf16/fp16) or 4 (fp32), "
                f"got {self.ext_metrics_bytes_per_element}.")
        if self.routing_trace_max_tokens < 1:
            raise MoEExtConfigError("--routing-trace-max-tokens must be >= 1.")
        if self.locmoe_local_bias_warmup_steps and not self.locmoe_local_bias:
            raise MoEExtConfigError("--moe-locmoe-local-bias-warmup-steps delays the local bias; add "
                                    "--moe-locmoe-local-bias B or drop the flag.")
        if self.locmoe_local_bias < 0:
            raise MoEExtConfigError("--moe-locmoe-local-bias must be >= 0 (it favours local experts).")
        if self.locmoe_mu < 0:
            raise MoEExtConfigError("--moe-locmoe-mu must be >= 0.")
        if not 0 < self.locmoe_eps < 1:
            raise MoEExtConfigError("--moe-locmoe-eps must be between 0 and 1 (exclusive).")
        if not 0 < self.locmoe_plus_tau <= 1:
            raise MoEExtConfigError("--moe-locmoe-plus-tau must be in (0, 1].")
        if self.locmoe_layout_ep is not None and self.locmoe_layout_ep < 1:
            raise MoEExtConfigError(
                f"--moe-locmoe-layout-ep must be a positive EP size, got {self.locmoe_layout_ep}.")
        if self.c2r_layout_ep is not None and self.c2r_layout_ep < 1:
            raise MoEExtConfigError(
                f"--moe-c2r-layout-ep must be a positive EP size, got {self.c2r_layout_ep}.")
        if self.c2r_plan and self.c2r_warmup_steps:
            raise MoEExtConfigError("--moe-c2r-plan and --moe-c2r-warmup-steps both set the partner "
                                    "lists; use one of them.")
        if self.scmoe == "off" and str(self.scmoe_expert_slot) != "auto":
            raise MoEExtConfigError("--moe-scmoe-expert-slot applies to ScMoE layers only; add "
                                    "--moe-scmoe pos1, pos2 or dgmoe or drop the flag.")
        if self.scmoe == "dgmoe" and self.router_policy in ("c2r", "locmoe-plus"):
            raise MoEExtConfigError(
                f"--moe-scmoe dgmoe excludes the previous pass's experts from the current pass, which "
                f"--moe-router-policy {self.router_policy} cannot honour; use topk or locmoe.")
        if (self.routing_trace_interval or self.routing_trace_max_tokens != 4096) and not self.save_routing_trace:
            raise MoEExtConfigError(
                "--routing-trace-interval and --routing-trace-max-tokens need --save-routing-trace DIR.")

    def policy_state(self) -> list:
        """Names of the persistent router state this configuration checkpoints and needs on
        resume (files/routing_marker.py); empty when the routers rebuild everything from flags."""
        state = []
        if self.router_policy == "c2r" and self.c2r_warmup_steps:
            state.append("c2r-warmup")
        if self.router_policy in _LOCMOE and self.locmoe_local_bias_warmup_steps:
            state.append("locmoe-bias-warmup")
        return state

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _literal_choices(f: dataclasses.Field) -> tuple:
    import typing

    return typing.get_args(f.type) if typing.get_origin(f.type) is Literal else ()
