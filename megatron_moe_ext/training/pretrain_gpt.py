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

_PROGRAM_START_TIME = time.time()

CPU_FLAG = "--cpu"


def main(argv: Optional[List[str]] = None) -> int:
    """Parse Megatron + plugin flags from `argv` (default sys.argv[1:]) and run pretrain()."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if CPU_FLAG in argv:
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
    from megatron.training.arguments import parse_and_validate_args

    from megatron_moe_ext.training import gpt_steps
    from megatron_moe_ext.training.plugin import (
        configure_model,
        extra_args_provider,
        finish_run,
    )

    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    # Megatron's parser reads sys.argv.
    sys.argv = [sys.argv[0]] + argv
    args = parse_and_validate_args(extra_args_provider=extra_args_provider(),
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    model_cfg = gpt_config_from_args(args)
    configure_model(args, model_cfg)
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
