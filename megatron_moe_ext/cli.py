"""`megatron-moe-ext <verb>`: the user surface.

Each verb is one module of `commands/` exposing `register(subparsers)`: it adds one sub-parser and
sets `func` (the parsed namespace -> exit code). Verbs report bad input by raising
`errors.UserError`; `main` prints it as one sentence and returns 2. Verb modules import torch and
Megatron only when they run, so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from megatron_moe_ext.errors import UserError

# verbs in the order `--help` lists them (module names in megatron_moe_ext.commands)
VERBS = ["quickstart", "pretrain", "prepare_data", "comm_volume", "profile", "plan_placement",
         "apply_placement", "plot_metrics", "export_hf", "import_hf", "flags"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-moe-ext",
        description="Communication-efficient expert-parallel MoE for Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERBS:
        importlib.import_module(f"megatron_moe_ext.commands.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `pretrain` hands every argument to Megatron's own parser untouched.
    if argv[:1] == ["pretrain"]:
        from megatron_moe_ext.commands.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"megatron-moe-ext {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
