"""`megatron-moe-ext pretrain ...`: the plugin's pretrain entry in one process (all arguments go to
Megatron's parser; `cli.main` hands them over untouched)."""

from __future__ import annotations


def register(subparsers) -> None:
    subparsers.add_parser(
        "pretrain", add_help=False,
        help="Megatron pretraining with the plugin's flags (all arguments go to Megatron).")


def main(argv) -> int:
    from megatron_moe_ext.training.pretrain_gpt import main as pretrain_main

    return pretrain_main(argv)
