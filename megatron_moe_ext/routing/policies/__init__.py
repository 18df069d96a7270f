"""The routing policies: one registry that training and the offline `comm-volume` both read.

Each policy is one module of this package holding its selection math (pure torch), the checks of
its options and its offline routing (`offline_route(scores, topk, ctx) -> BoolTensor[T, E]`).
The entry here names it, says what it does, names its Megatron router adapter (resolved by
`mcore/specs.py`; this package never imports Megatron) and lists the options `comm-volume` takes
for it. Importing this module loads no torch, so `--help` stays quick.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class OfflineOption:
    """A `comm-volume` flag of one policy: `--<flag>` arrives as ctx.options[<flag with _>]."""

    flag: str
    type: type
    default: object
    help: str
    metavar: Optional[str] = None


@dataclass(frozen=True)
class Policy:
    name: str
    help: str
    module: str        # megatron_moe_ext.routing.policies.<module>: selection math, offline_route
    router: str        # "module:Class" of the Megatron router adapter that trains with it
    offline_options: Tuple[OfflineOption, ...] = field(default=())

    def offline_route(self) -> Callable:
        """`fn(scores [T, E], topk, OfflineContext) -> BoolTensor[T, E]`, the experts each token uses."""
        return importlib.import_module(f"{__name__}.{self.module}").offline_route


_ROUTERS = "megatron_moe_ext.mcore.router"

POLICIES: Dict[str, Policy] = {p.name: p for p in (
    Policy("topk", "plain top-k (Megatron's TopKRouter)", "topk", f"{_ROUTERS}:TopKPolicyRouter"),
    Policy("c2r", "collaboration-constrained: top-1 free, the other k-1 among its partners",
           "c2r", f"{_ROUTERS}:C2RRouter", (
               OfflineOption("top-t", int, None, "c2r: partners per expert (default: experts per rank - 1)",
                             "T"),
               OfflineOption("plan", str, None, "c2r: partner lists from plan-placement", "PLAN.json"))),
    Policy("locmoe", "locality-aware: top-k with a locality loss toward the token's node",
           "locmoe", f"{_ROUTERS}:LocMoERouter", (
               OfflineOption("local-bias", float, 0.0,
                             "locmoe: the run's --moe-locmoe-local-bias (traces hold unbiased logits)", "B"),)),
    Policy("locmoe-plus", "LocMoE+: affinity token choice, then each expert keeps its C best tokens",
           "locmoe_plus", f"{_ROUTERS}:LocMoEPlusRouter", (
               OfflineOption("tau", float, 0.8, "locmoe-plus: the run's --moe-locmoe-plus-tau"),
               OfflineOption("capacity-factor", float, 1.0,
                             "locmoe-plus: expert capacity as a factor of T*k/E (the run's "
                             "--moe-expert-capacity-factor, or its re-estimated capacity)"))),
)}

POLICY_NAMES: Tuple[str, ...] = tuple(POLICIES)


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"routing policy {name!r} is unknown; choose one of {', '.join(POLICY_NAMES)}.") from None
