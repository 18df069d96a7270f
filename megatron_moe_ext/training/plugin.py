"""The two calls that put the plugin into a Megatron-LM style `pretrain_gpt.py` main block.

    args = parse_and_validate_args(extra_args_provider=extra_args_provider(<yours or None>), ...)
    model_cfg = gpt_config_from_args(args)
    configure_model(args, model_cfg)          # validates, installs the spec and run hooks
    full_config = pretrain_cfg_container_from_args(args, model_cfg)
    pretrain(full_config, ...)
    finish_run()                              # writes the collaboration profile, if asked for

The plugin's own entry (`pretrain_gpt.py` here) and the patch for Megatron-LM checkouts
(`patches/`) both use exactly these, so the two stay the same program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from megatron_moe_ext.args import add_moe_ext_args, exit_with, moe_ext_config_from_args
from megatron_moe_ext.config import MoEExtConfig, MoEExtConfigError
from megatron_moe_ext.errors import UserError
from megatron_moe_ext.training.run_hooks import finish_run  # noqa: F401  (re-exported for entries)


def extra_args_provider(chain: Optional[Callable] = None) -> Callable:
    """An `extra_args_provider` adding the plugin's flags after `chain`'s (e.g. ModelOpt's)."""

    def provider(parser):
        if chain is not None:
            parser = chain(parser)
        return add_moe_ext_args(parser)

    return provider


def configure_model(args: Any, model_cfg: Any) -> MoEExtConfig:
    """Validate the plugin's flags (exit with one sentence if invalid), install the plugin's block
    spec unless `--spec` chose another, and register the run hooks. Returns the config."""
    from megatron_moe_ext.compat.megatron_0_19 import apply_patches
    from megatron_moe_ext.mcore.specs import moe_ext_decoder_block_spec
    from megatron_moe_ext.training.run_hooks import install_run_hooks

    apply_patches("always")  # the wheel's compile_helpers, the router-padding fix
    ext_cfg = moe_ext_config_from_args(args)
    if ext_cfg.c2r_plan:
        try:
            _check_placement(args, ext_cfg.c2r_plan)
        except UserError as e:
            exit_with(e)
    # ours by default, or named by `--spec megatron_moe_ext.mcore.specs moe_ext_decoder_block_spec`
    if model_cfg.transformer_layer_spec in (None, moe_ext_decoder_block_spec):
        model_cfg.transformer_layer_spec = functools.partial(moe_ext_decoder_block_spec,
                                                             ext_cfg=ext_cfg)
    install_run_hooks(model_cfg, ext_cfg)
    return ext_cfg


def _check_placement(args: Any, plan_path: str) -> None:
    """A plan that moves experts must meet a checkpoint re-placed by it; checkpoints this run
    saves are in the plan's order, so they get the same marker (written by one rank)."""
    import os

    from megatron_moe_ext.files.plan import check_plan_applied, write_placement_marker

    load = getattr(args, "load", None)
    if load and os.path.exists(os.path.join(load, "latest_checkpointed_iteration.txt")):
        reason = check_plan_applied(load, plan_path)
        if reason:
            raise MoEExtConfigError(f"--moe-c2r-plan {reason}")
    save = getattr(args, "save", None)
    # torch.distributed is not initialised yet here: the launcher's RANK says which rank we are
    if save and int(os.environ.get("RANK", "0")) == 0:
        write_placement_marker(save, plan_path, source="trained with this plan")
