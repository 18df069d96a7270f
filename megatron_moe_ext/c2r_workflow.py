"""The C2R workflow verbs: `profile` (record co-activation) and `plan-placement` (profile -> plan).

    megatron-moe-ext profile --output prof/ --nproc 8 -- <pretrain flags with --load CKPT>
    megatron-moe-ext plan-placement --profile prof/ --ep 8 --top-t 7 --output plan.json
    megatron-moe-ext apply-placement ...          (convert/apply_placement.py)
    ... pretrain ... --moe-router-policy c2r --moe-c2r-plan plan.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Dict

import torch

from megatron_moe_ext.routing.collaboration import partner_lists
from megatron_moe_ext.routing.placement import (
    balanced_placement,
    expert_to_slot_from_ranks,
    intra_rank_fraction,
    random_placement,
)
from megatron_moe_ext.routing.plan import Plan, PlanError, load_profile, save_plan


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="Record per-layer expert co-activation of a checkpoint over data.",
        description="Runs the pretrain entry with --skip-train (evaluation batches only) and "
                    "--moe-profile-collaboration OUTPUT; flags after `--` go to it unchanged "
                    "(model, data, --load CKPT, --eval-iters N).")
    p.add_argument("--output", required=True, help="folder for profile.json and the .npy matrices")
    p.add_argument("--nproc", type=int, default=1, help="ranks to launch (torchrun)")
    p.add_argument("--cpu", action="store_true", help="run on CPU through the compatibility layer")
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_profile)

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
    q.add_argument("--output", required=True, help="plan file to write (never overwritten)")
    q.set_defaults(func=run_plan)


def _fail(verb: str, msg: str) -> int:
    from megatron_moe_ext.cli import fail

    return fail(verb, msg)


def run_profile(ns: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(ns.output, "profile.json")):
        return _fail("profile", f"--output {ns.output} already holds a profile.json; choose an empty folder.")
    extra = [a for a in ns.pretrain_args if a != "--"]
    if "--load" not in extra:
        return _fail("profile", "pass the checkpoint to profile after `--`, e.g. `-- --load CKPT ...`.")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ns.nproc),
           "-m", "megatron_moe_ext.training.pretrain_gpt", *(["--cpu"] if ns.cpu else []),
           *extra, "--skip-train", "--no-load-optim", "--no-load-rng",
           "--moe-profile-collaboration", ns.output]
    return subprocess.call(cmd)


def plan_layer(coact: torch.Tensor, ep: int, top_t: int, *, co_resident_only: bool,
               keep_placement: bool, seed: int):
    """One layer's (expert_to_slot [E], physical partners [E, T], report dict)."""
    E = coact.shape[0]
    identity = torch.arange(E) // (E // ep)
    rank = identity if keep_placement else balanced_placement(coact, ep, seed=seed)
    slot = expert_to_slot_from_ranks(rank, ep)
    logical = partner_lists(coact, top_t, expert_to_rank=rank, co_resident_only=co_resident_only)
    physical = torch.empty_like(logical)
    physical[slot] = slot[logical]        # row slot[e] lists the slots of e's partners
    report = {"planned": intra_rank_fraction(coact, rank),
              "identity": intra_rank_fraction(coact, identity),
              "random": intra_rank_fraction(coact, random_placement(E, ep, seed=seed + 1))}
    return slot, physical, report


def run_plan(ns: argparse.Namespace) -> int:
    try:
        prof = load_profile(ns.profile)
    except PlanError as e:
        return _fail("plan-placement", str(e))
    E = prof.num_experts
    if ns.ep < 1 or E % ns.ep:
        return _fail("plan-placement", f"--ep {ns.ep} does not divide the profile's {E} experts.")
    top_t = E // ns.ep - 1 if ns.top_t is None else ns.top_t
    if top_t < prof.topk - 1:
        return _fail("plan-placement", f"--top-t {top_t} is less than k-1 = {prof.topk - 1} of the profiled model.")
    slots, partners, report = {}, {}, {}
    try:
        for layer, coact in sorted(prof.coactivation.items()):
            slots[layer], partners[layer], report[layer] = plan_layer(
                coact, ns.ep, top_t, co_resident_only=ns.co_resident_only,
                keep_placement=ns.keep_placement, seed=ns.seed)
        path = save_plan(ns.output, Plan(E, ns.ep, top_t, ns.co_resident_only, slots, partners),
                         report=report, profile=str(ns.profile))
    except (ValueError, PlanError) as e:
        return _fail("plan-placement", str(e))
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
