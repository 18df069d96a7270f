"""Pretrain a GPT(-MoE) with the plugin: Megatron-LM's `pretrain_gpt.py` flow on the wheel's
`megatron.training`, plus the plugin's flags, layer specs and metrics.

    torchrun --nproc-per-node 8 -m megatron_moe_ext.training.pretrain_gpt <Megatron flags> <plugin flags>
    megatron-moe-ext pretrain <same flags>          (a single process, or under torchrun)

The flow is the stock one: parse_and_validate_args(extra_args_provider) -> gpt_config_from_args
-> pretrain_cfg_container_from_args -> pretrain. The plugin steps in at three places only: its
flags (validated right after parsing, before anything is initialised), the decoder block spec
(unless `--spec` names another), and the run hooks that log `moe_ext/*` metrics. Megatron's
TP/PP/EP, distributed checkpointing, logging and evaluation run unchanged.

`--cpu` (plugin-only, stripped before Megatron parses) enables the CPU compatibility layer and
prepends the flags a CPU run needs (local transformer implementation, gloo, no fusions); later
flags on the command line still win.
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional

from megatron_moe_ext.args import exit_with
from megatron_moe_ext.errors import UserError

_PROGRAM_START_TIME = time.time()

CPU_FLAG = "--cpu"
PROG = "megatron-moe-ext pretrain"


def main(argv: Optional[List[str]] = None) -> int:
    """Parse Megatron + plugin flags from `argv` (default sys.argv[1:]) and run pretrain()."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return print_help()
    on_cpu = CPU_FLAG in argv
    if not on_cpu:
        import torch

        if not torch.cuda.is_available():
            # Megatron would fail later asking for Transformer Engine, which is not the fix here.
            exit_with(UserError("no CUDA device is visible; add --cpu to run on CPU through the "
                                "compatibility layer."), prog=PROG)
    _single_process_defaults()
    if on_cpu:
        from megatron_moe_ext.compat.cpu import enable_cpu_compat
        from megatron_moe_ext.compat.presets import CPU_MEGATRON_FLAGS

        argv = CPU_MEGATRON_FLAGS + [a for a in argv if a != CPU_FLAG]
        enable_cpu_compat()

    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain, set_startup_timestamps
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )

    from megatron_moe_ext.training import gpt_steps
    from megatron_moe_ext.training.plugin import configure_model, finish_run

    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    args, ext_cfg = parse_and_check_args(argv)
    model_cfg = gpt_config_from_args(args)
    configure_model(args, model_cfg, ext_cfg=ext_cfg)
    full_config = pretrain_cfg_container_from_args(args, model_cfg)

    gpt_steps.train_valid_test_datasets_provider.is_distributed = True
    wrapped_pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    wrapped_pretrain(
        full_config,
        gpt_steps.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        gpt_steps.forward_step,
        store=store,
    )
    finish_run()
    _end_process_group()
    return 0


def parse_and_check_args(argv: List[str]):
    """Megatron's parse_and_validate_args, then the plugin's checks, before Megatron's argument
    dump is shown: a refusal is the one thing printed (no ~870 lines above it to scroll past).
    Returns (args, MoEExtConfig); exits 2 with one sentence on a bad plugin flag or path."""
    import contextlib
    import io

    from megatron.training.arguments import parse_and_validate_args

    from megatron_moe_ext.training.plugin import check_args, extra_args_provider

    sys.argv = [sys.argv[0]] + argv  # Megatron's parser reads sys.argv
    dump = io.StringIO()
    try:
        with contextlib.redirect_stdout(dump):
            args = parse_and_validate_args(extra_args_provider=extra_args_provider(),
                                           args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
        ext_cfg = check_args(args)
    except UserError as e:
        exit_with(e, prog=PROG)
    except BaseException:
        sys.stdout.write(dump.getvalue())  # Megatron's own failure: show what it printed first
        raise
    sys.stdout.write(dump.getvalue())
    sys.stdout.flush()
    return args, ext_cfg


def _single_process_defaults() -> None:
    """Outside torchrun (`megatron-moe-ext pretrain ...`), Megatron's env:// rendezvous still wants
    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: give it a one-process group on a free port."""
    import os

    if "WORLD_SIZE" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return  # launched by torchrun or another launcher: its settings stand
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def print_help() -> int:
    """Megatron's flags and the plugin's. Megatron 0.19's help texts hold bare `%` (e.g. "10%)"),
    which argparse's %-formatting rejects, so every `%` not starting `%(name)s` is escaped."""
    import argparse
    import re

    from megatron.training.arguments import add_megatron_arguments

    from megatron_moe_ext.training.plugin import extra_args_provider

    parser = argparse.ArgumentParser(prog="megatron-moe-ext pretrain", allow_abbrev=False,
                                     description="Megatron pretraining with the plugin's flags "
                                                 "(megatron-moe-ext group at the end); --cpu runs "
                                                 "on CPU through the compatibility layer.")
    parser = extra_args_provider()(add_megatron_arguments(parser))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    parser.print_help()
    return 0


def _end_process_group() -> None:
    """End the default process group in step on every rank, as torch asks: left to interpreter
    exit, a gloo rank tearing its group down while a peer still uses the connection sometimes
    aborts ("terminate called without an active exception"; seen with --skip-train on CPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
