"""`megatron-moe-ext apply-placement`: move experts of a Megatron checkpoint to their planned slots.

For each MoE layer of the plan, expert e moves to slot `expert_to_slot[e]` in the expert weights,
the router rows, the expert bias and their optimizer states, so the model computes the same
function with C2R's partners on one rank. Works on Megatron's torch_dist checkpoints on one CPU
process; the input is only read, the output folder must be new, and everything is checked before
anything is written (library: `convert/apply_placement.py`).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "apply-placement", help="Rewrite a Megatron checkpoint so experts sit in their planned slots.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (with latest_checkpointed_iteration.txt) "
                                                 "or one iter_XXXXXXX folder")
    p.add_argument("--plan", required=True)
    p.add_argument("--save", required=True, help="new checkpoint folder (must not exist)")
    p.add_argument("--drop-optimizer", action="store_true",
                   help="write the model only (no optimizer state); resume with --no-load-optim")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.convert.apply_placement import apply_placement

    out = apply_placement(ns.load, ns.plan, ns.save, drop_optimizer=ns.drop_optimizer)
    print(f"wrote {out}")
    return 0
