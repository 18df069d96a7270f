"""Command-line flags for Megatron's `extra_args_provider`, and Megatron args -> MoEExtConfig.

Usage with Megatron-LM's flow:

    args = parse_and_validate_args(extra_args_provider=add_moe_ext_args)
    ext_cfg = moe_ext_config_from_args(args)   # exits with one sentence on a bad combination
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from megatron_moe_ext.config import (
    EXPERT_BACKENDS,
    ROUTER_POLICIES,
    SCMOE_CHOICES,
    SCMOE_SLOTS,
    MoEExtConfig,
    MoEExtConfigError,
)

# args attribute -> MoEExtConfig field, for the fields whose flag is not `--moe-<field>`.
_ATTR_FOR_FIELD = {
    "router_policy": "moe_router_policy",
    "ranks_per_node": "moe_ranks_per_node",
    "ext_metrics": "moe_ext_metrics",
    "ext_metrics_bytes_per_element": "moe_ext_metrics_bytes_per_element",
    "run_log": "moe_ext_run_log",
    "save_routing_trace": "save_routing_trace",
    "c2r_top_t": "moe_c2r_top_t",
    "c2r_plan": "moe_c2r_plan",
    "c2r_warmup_steps": "moe_c2r_warmup_steps",
    "profile_collaboration": "moe_profile_collaboration",
    "dedup_dispatch": "moe_dedup_dispatch",
    "locmoe_mu": "moe_locmoe_mu",
    "locmoe_eps": "moe_locmoe_eps",
    "locmoe_gate": "moe_locmoe_gate",
    "locmoe_capacity": "moe_locmoe_capacity",
    "locmoe_local_bias": "moe_locmoe_local_bias",
    "locmoe_local_bias_warmup_steps": "moe_locmoe_local_bias_warmup_steps",
    "locmoe_plus_tau": "moe_locmoe_plus_tau",
    "locmoe_plus_reestimate_interval": "moe_locmoe_plus_reestimate_interval",
    "routing_trace_interval": "routing_trace_interval",
    "routing_trace_max_tokens": "routing_trace_max_tokens",
}


def add_moe_ext_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flags to `parser` (Megatron's `extra_args_provider` signature)."""
    d = MoEExtConfig.__dataclass_fields__
    g = parser.add_argument_group(title="megatron-moe-ext")
    g.add_argument("--moe-router-policy", choices=ROUTER_POLICIES, default=d["router_policy"].default,
                   help="Routing policy of every MoE layer: topk (Megatron's TopKRouter), c2r "
                        "(collaboration-constrained), locmoe, locmoe-plus (locality-aware).")
    g.add_argument("--moe-ranks-per-node", type=int, default=None,
                   help="GPUs per node, for inter-node accounting and locality "
                        "(default: LOCAL_WORLD_SIZE from the launcher).")
    g.add_argument("--moe-ext-metrics", action=argparse.BooleanOptionalAction,
                   default=d["ext_metrics"].default,
                   help="Log moe_ext/* metrics: all-to-all rows and bytes per token (remote, "
                        "inter-node), distinct destination ranks, per-expert load and its CV.")
    g.add_argument("--moe-ext-metrics-bytes-per-element", type=int,
                   default=d["ext_metrics_bytes_per_element"].default,
                   help="Bytes per element of dispatched activations for the byte counts (2 = bf16).")
    g.add_argument("--moe-ext-run-log", type=str, default=None, metavar="FILE",
                   help="Append train/validation losses and moe_ext metrics to FILE as JSON lines.")
    g.add_argument("--save-routing-trace", type=str, default=None, metavar="DIR",
                   help="Write the router logits of every MoE layer to DIR (routing_trace_*.pt) "
                        "for `megatron-moe-ext comm-volume --trace`.")
    g.add_argument("--routing-trace-interval", type=int, default=d["routing_trace_interval"].default,
                   help="Record a routing trace every N iterations (0: only at the last iteration).")
    g.add_argument("--routing-trace-max-tokens", type=int,
                   default=d["routing_trace_max_tokens"].default,
                   help="Keep at most this many tokens per layer in each recorded trace.")
    g.add_argument("--moe-c2r-top-t", type=int, default=None, metavar="T",
                   help="C2R: partners per expert among which the k-1 non-top-1 experts are chosen "
                        "(default: experts per EP rank - 1, which keeps a token on one rank).")
    g.add_argument("--moe-c2r-plan", type=str, default=None, metavar="PLAN.json",
                   help="C2R: partner lists from `megatron-moe-ext plan-placement`.")
    g.add_argument("--moe-c2r-warmup-steps", type=int, default=0, metavar="W",
                   help="C2R from scratch: plain top-k for W iterations while profiling, then "
                        "partners among co-resident experts, frozen and checkpointed.")
    g.add_argument("--moe-profile-collaboration", type=str, default=None, metavar="DIR",
                   help="Record expert co-activation of every MoE layer and write a collaboration "
                        "profile to DIR at the end of the run (see `megatron-moe-ext profile`).")
    g.add_argument("--moe-locmoe-mu", type=float, default=d["locmoe_mu"].default,
                   help="LocMoE: coefficient of the locality loss mu * KL(D_c || D_l).")
    g.add_argument("--moe-locmoe-eps", type=float, default=d["locmoe_eps"].default,
                   help="LocMoE: mass the fully localized distribution leaves on remote experts.")
    g.add_argument("--moe-locmoe-gate", choices=("learned", "grap"), default=d["locmoe_gate"].default,
                   help="LocMoE: learned gate initialised to GrAP, or the fixed GrAP gate.")
    g.add_argument("--moe-locmoe-local-bias", type=float, default=0.0, metavar="B",
                   help="LocMoE: add B to the selection scores of experts on the token's own node "
                        "(selection only; beyond the paper).")
    g.add_argument("--moe-locmoe-local-bias-warmup-steps", type=int, default=0, metavar="W",
                   help="LocMoE: no local bias for the first W training iterations, then B.")
    g.add_argument("--moe-locmoe-capacity", choices=("off", "bound"), default="off",
                   help="LocMoE: expert capacity from the paper's lower bound (estimated each step), "
                        "clamped to --moe-expert-capacity-factor.")
    g.add_argument("--moe-locmoe-plus-tau", type=float, default=d["locmoe_plus_tau"].default,
                   help="LocMoE+: a token proposes its fewest top experts whose affinities reach "
                        "tau x its positive affinity sum (at most k).")
    g.add_argument("--moe-locmoe-plus-reestimate-interval", type=int,
                   default=d["locmoe_plus_reestimate_interval"].default, metavar="N",
                   help="LocMoE+: re-estimate the expert capacity every N iterations (0: never).")
    g.add_argument("--moe-dedup-dispatch", action="store_true",
                   help="Send each token once per destination EP rank instead of once per expert.")
    g.add_argument("--moe-expert-backend", choices=EXPERT_BACKENDS, default=None,
                   help="Routed experts: te (Megatron's TEGroupedMLP), torch (the plugin's "
                        "torch._grouped_mm experts, FP8 GEMMs under --fp8-format; no TE needed), "
                        "sequential (Megatron's SequentialMLP). Default: Megatron's choice.")
    g.add_argument("--moe-scmoe", choices=SCMOE_CHOICES, default="off",
                   help="Shortcut-connected MoE: the routed experts read the previous block's "
                        "representation (pos2: its post-attention stream, for dense/MoE alternation; "
                        "pos1: its output, for every-layer MoE) beside a gated shared expert, or "
                        "dgmoe: two top-k passes of one expert set on the previous and current streams.")
    g.add_argument("--moe-scmoe-expert-slot", choices=SCMOE_SLOTS, default="auto",
                   help="ScMoE: main-stream point of the routed experts' GEMMs (1: before block l's "
                        "MLP, 2: before block l+1's attention, 3: after it, 4: after the shared "
                        "expert; auto: time them over the first steps and keep the fastest).")
    return parser


def moe_ext_config_from_args(args: argparse.Namespace, *, exit_on_error: bool = True
                             ) -> MoEExtConfig:
    """Build and validate the plugin config from Megatron's parsed args.

    On an invalid option this prints one sentence naming the flag and exits with status 2, as
    argparse does, unless `exit_on_error=False`, in which case MoEExtConfigError propagates.
    """
    kwargs = {}
    for f in dataclasses.fields(MoEExtConfig):
        attr = _ATTR_FOR_FIELD.get(f.name, "moe_" + f.name)
        if hasattr(args, attr):
            kwargs[f.name] = getattr(args, attr)
    try:
        cfg = MoEExtConfig(**kwargs)
        cfg.validate_with_megatron(
            num_experts=getattr(args, "num_experts", None),
            topk=getattr(args, "moe_router_topk", 2),
            ep_size=getattr(args, "expert_model_parallel_size", 1),
            world_size=getattr(args, "world_size", 1),
            megatron_args=args,
        )
    except MoEExtConfigError as e:
        if not exit_on_error:
            raise
        _exit_with(str(e))
    return cfg


def _exit_with(message: str, prog: Optional[str] = None) -> None:
    print(f"{prog or 'megatron-moe-ext'}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
