"""`megatron-moe-ext <verb>`: the user surface.

Each verb lives in its own module, which exposes `register(subparsers)`: it adds one sub-parser
and sets `func=<callable taking the parsed namespace, returning an exit code>`. Modules are
imported only when listed here, so `--help` stays quick and a verb's heavy imports (Megatron,
torch) load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# verb module paths, in the order `--help` lists them
_VERB_MODULES = [
    "megatron_moe_ext.training.quickstart",
    "megatron_moe_ext.training.pretrain_gpt",
    "megatron_moe_ext.training.data",
    "megatron_moe_ext.comm_volume",
    "megatron_moe_ext.c2r_workflow",
    "megatron_moe_ext.convert.apply_placement",
    "megatron_moe_ext.plots",
]


def fail(verb: str, message: str) -> int:
    """Print `megatron-moe-ext VERB: error: MESSAGE` (one sentence) and return exit code 2."""
    print(f"megatron-moe-ext {verb}: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-moe-ext",
        description="Communication-efficient expert-parallel MoE for Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for mod in _VERB_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `pretrain` hands every argument to Megatron's own parser untouched.
    if argv[:1] == ["pretrain"]:
        from megatron_moe_ext.training.pretrain_gpt import main as pretrain_main

        return pretrain_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
