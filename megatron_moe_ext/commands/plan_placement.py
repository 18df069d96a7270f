"""`megatron-moe-ext plan-placement`: a collaboration profile -> expert placement and C2R partners.

    megatron-moe-ext plan-placement --profile prof/ --ep 8 --top-t 7 --output plan.json
"""

from __future__ import annotations

import argparse
import os
from typing import Dict

from megatron_moe_ext.errors import UserError


def register(subparsers) -> None:
    q = subparsers.add_parser(
        "plan-placement", help="Plan expert placement and C2R partner lists from a profile.",
        description="Per MoE layer: a balanced expert->rank grouping maximizing co-activation "
                    "inside ranks, and each expert's Top-T partners (by co-activation), written "
                    "as a versioned JSON plan with partners indexed by physical slot.")
    q.add_argument("--profile", required=True, help="profile folder (or its profile.json)")
    q.add_argument("--ep", type=int, required=True, help="expert-parallel size of the target run")
    q.add_argument("--top-t", type=int, default=None,
                   help="partners per expert (default: experts per rank - 1)")
    q.add_argument("--co-resident-only", action="store_true",
                   help="partners only among experts of the same rank: one rank per token")
    q.add_argument("--keep-placement", action="store_true",
                   help="do not move experts (identity placement); only plan partners")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--output", required=True, help="plan file to write (not overwritten without --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --output plan file")
    q.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.files.plan import Plan, load_profile, save_plan
    from megatron_moe_ext.routing.placement import plan_layer

    if os.path.isdir(ns.output):
        raise UserError(f"--output {ns.output} is a folder; give the plan's file path.")
    if os.path.exists(ns.output) and not ns.overwrite:  # before the planning work, not after
        raise UserError(f"--output {ns.output} exists; choose another path or pass --overwrite.")
    prof = load_profile(ns.profile)
    E = prof.num_experts
    if ns.ep < 1 or E % ns.ep:
        raise UserError(f"--ep {ns.ep} does not divide the profile's {E} experts.")
    top_t = E // ns.ep - 1 if ns.top_t is None else ns.top_t
    if top_t < prof.topk - 1:
        raise UserError(f"--top-t {top_t} is less than k-1 = {prof.topk - 1} of the profiled model.")
    slots, partners, report = {}, {}, {}
    try:
        for layer, coact in sorted(prof.coactivation.items()):
            slots[layer], partners[layer], report[layer] = plan_layer(
                coact, ns.ep, top_t, co_resident_only=ns.co_resident_only,
                keep_placement=ns.keep_placement, seed=ns.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    path = save_plan(ns.output, Plan(E, ns.ep, top_t, ns.co_resident_only, slots, partners),
                     report=report, profile=str(ns.profile), overwrite=ns.overwrite)
    _print_report(report)
    print(f"wrote {path}")
    return 0


def _print_report(report: Dict[int, dict]) -> None:
    print("co-activation kept inside EP ranks (share of off-diagonal counts)")
    print(f"{'layer':>6s}{'planned':>10s}{'identity':>10s}{'random':>10s}")
    for layer, r in sorted(report.items()):
        print(f"{layer:>6d}{r['planned']:>10.3f}{r['identity']:>10.3f}{r['random']:>10.3f}")
    n = len(report)
    print(f"{'mean':>6s}" + "".join(f"{sum(r[k] for r in report.values()) / n:>10.3f}"
                                    for k in ("planned", "identity", "random")))
