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
from megatron_moe_ext.config import MoEExtConfig
from megatron_moe_ext.errors import UserError
from megatron_moe_ext.training.run_hooks import finish_run  # noqa: F401  (re-exported for entries)


def extra_args_provider(chain: Optional[Callable] = None) -> Callable:
    """An `extra_args_provider` adding the plugin's flags after `chain`'s (e.g. ModelOpt's)."""

    def provider(parser):
        if chain is not None:
            parser = chain(parser)
        return add_moe_ext_args(parser)

    return provider


def check_args(args: Any) -> MoEExtConfig:
    """The plugin's parse-time checks (flags, paths, the checkpoint to load) on Megatron's parsed
    args; raises UserError with one sentence. Side-effect free, so an entry may run it before
    Megatron's argument dump is shown."""
    return moe_ext_config_from_args(args, exit_on_error=False)


def configure_model(args: Any, model_cfg: Any, ext_cfg: Optional[MoEExtConfig] = None) -> MoEExtConfig:
    """Validate the plugin's flags (exit with one sentence if invalid; skipped when the entry
    passes the `ext_cfg` that `check_args` returned), install the plugin's block spec unless
    `--spec` chose another, record the routing policy (and plan) beside the checkpoints this run
    saves, and register the run hooks. Returns the config."""
    from megatron_moe_ext.compat.megatron_0_19 import apply_patches
    from megatron_moe_ext.mcore.specs import moe_ext_decoder_block_spec
    from megatron_moe_ext.training.run_hooks import install_run_hooks

    apply_patches("always")  # the wheel's compile_helpers, the router-padding fix
    if ext_cfg is None:
        try:
            ext_cfg = check_args(args)
        except UserError as e:
            exit_with(e)
    _write_markers(args, ext_cfg)
    # ours by default, or named by `--spec megatron_moe_ext.mcore.specs moe_ext_decoder_block_spec`
    if model_cfg.transformer_layer_spec in (None, moe_ext_decoder_block_spec):
        model_cfg.transformer_layer_spec = functools.partial(moe_ext_decoder_block_spec,
                                                             ext_cfg=ext_cfg)
    install_run_hooks(model_cfg, ext_cfg)
    return ext_cfg


def _write_markers(args: Any, ext_cfg: MoEExtConfig) -> None:
    """Checkpoints this run saves carry its routing policy and state, and are in the plan's
    expert order (placement marker), so the next run that loads them is checked against both.
    Written after `check_args` read the --load folder's markers (it may be the same folder)."""
    import os

    from megatron_moe_ext.files.plan import write_placement_marker
    from megatron_moe_ext.files.routing_marker import write_routing_marker

    save = getattr(args, "save", None)
    # torch.distributed is not initialised yet here: the launcher's RANK says which rank we are
    if not save or int(os.environ.get("RANK", "0")) != 0:
        return
    # an evaluation-only run (`profile`: --skip-train) saves nothing, so it must not relabel the
    # checkpoint it reads (--save is often --load); a training run's checkpoints are its policy's
    if not getattr(args, "skip_train", False):
        write_routing_marker(save, ext_cfg.router_policy, ext_cfg.policy_state())
    if ext_cfg.c2r_plan:
        write_placement_marker(save, ext_cfg.c2r_plan, source="trained with this plan")
