"""Megatron's own GPTModel on one CPU gloo rank: built from flags, loaded from and saved to
torch_dist checkpoints through Megatron's dist checkpointing.

Import uses this so that the keys, sharding metadata, `_extra_state` objects and saved `args`
of what it writes are exactly what Megatron itself writes (its loader then reshards the global
tensors to any TP/PP/EP); tests use it to get Megatron's logits of a checkpoint. Everything runs
in this process on the CPU (`compat.cpu`); it refuses to run where CUDA is available, because
the CPU layer would move GPU work to the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

# Flags a one-rank build needs besides the model flags: a batch shape and a tokenizer that
# validate_args accepts; no data is read.
_BUILD_FLAGS = [
    "--micro-batch-size",
    "1",
    "--tokenizer-type",
    "NullTokenizer",
    "--train-iters",
    "1",
    "--lr",
    "1e-4",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--ckpt-format",
    "torch_dist",
]


def _init_one_rank() -> None:
    import torch.distributed as dist

    from megatron_moe_ext.compat.cpu import enable_cpu_compat

    enable_cpu_compat()
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)


def parse_megatron_args(model_flags: List[str]):
    """Megatron's argparse namespace (with the plugin's flags) for a one-rank CPU build; the
    parallel sizes in `model_flags` are replaced by 1 (the checkpoint format is layout-free)."""
    from megatron.training.arguments import parse_and_validate_args

    from megatron_moe_ext.args import add_moe_ext_args
    from megatron_moe_ext.compat.presets import CPU_MEGATRON_FLAGS

    _init_one_rank()
    flags = list(model_flags)
    for name in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--expert-model-parallel-size",
    ):
        while name in flags:
            i = flags.index(name)
            del flags[i : i + 2]
    seq = (
        []
        if "--seq-length" in flags
        else ["--seq-length", flags[flags.index("--max-position-embeddings") + 1]]
    )
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import unset_global_variables

    # parse_and_validate_args sets Megatron's process-wide globals; a second build replaces them
    unset_global_variables()
    destroy_num_microbatches_calculator()
    saved = sys.argv
    sys.argv = ["megatron-moe-ext"] + CPU_MEGATRON_FLAGS + flags + seq + _BUILD_FLAGS
    try:
        # validate_args prints every argument on rank 0; a converter's output should be its own.
        with contextlib.redirect_stdout(io.StringIO()):
            args = parse_and_validate_args(extra_args_provider=add_moe_ext_args)
    finally:
        sys.argv = saved
    return args


def build_gpt_model(model_flags: List[str]) -> Tuple[torch.nn.Module, object]:
    """(GPTModel in float32 on the CPU, its Megatron args) for `model_flags`, TP=PP=EP=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder

    from megatron_moe_ext.args import moe_ext_config_from_args
    from megatron_moe_ext.compat.cpu import reset_rng_tracker_for_cpu
    from megatron_moe_ext.compat.megatron_0_19 import apply_patches
    from megatron_moe_ext.mcore.specs import moe_ext_decoder_block_spec

    args = parse_megatron_args(model_flags)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    reset_rng_tracker_for_cpu()
    model_cfg = gpt_config_from_args(args)
    # The decoder spec and Megatron fixes of the pretrain entry (training.plugin.configure_model),
    # without its run hooks, so the model and its checkpoint keys are the ones training uses.
    apply_patches("always")
    if model_cfg.transformer_layer_spec is None:
        model_cfg.transformer_layer_spec = functools.partial(
            moe_ext_decoder_block_spec, ext_cfg=moe_ext_config_from_args(args)
        )
    model = GPTModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    model.eval()
    return model, args


def _tensor_items(sharded: dict) -> dict:
    """The model's sharded state dict without its ShardedObjects (`_extra_state`): only tensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in sharded.items() if not isinstance(v, ShardedObject)}


def load_model_tensors(model, iter_dir: Path) -> None:
    """Fill `model`'s parameters from a torch_dist iteration folder (any TP/PP/EP it was saved
    with) through Megatron's own loader; extra states are left as built."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.load(_tensor_items(model.sharded_state_dict()), str(iter_dir))


def save_checkpoint(model, args, root: Path, iteration: Optional[int] = None) -> Path:
    """Megatron's checkpoint layout: root/latest_checkpointed_iteration.txt and root/release/ (or
    root/iter_<N>/) with the model and `args` (what Megatron's loader reads for --load/--finetune)."""
    from megatron.core import dist_checkpointing

    iteration_name = "release" if iteration is None else f"iter_{iteration:07d}"
    it_dir = root / iteration_name
    it_dir.mkdir(parents=True)
    try:  # the versioning metadata Megatron's own save_checkpoint records (private helpers)
        from megatron.training.checkpointing import (
            _build_sharded_state_dict_metadata,
            _clean_metadata_for_serialization,
        )

        content = _build_sharded_state_dict_metadata(args)
        state = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": iteration or 0,
            "model": model.sharded_state_dict(metadata=content),
        }
        dist_checkpointing.save(
            state, str(it_dir), content_metadata=_clean_metadata_for_serialization(content)
        )
    except ImportError:
        state = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": iteration or 0,
            "model": model.sharded_state_dict(),
        }
        dist_checkpointing.save(state, str(it_dir))
    (root / "latest_checkpointed_iteration.txt").write_text(
        "release" if iteration is None else str(iteration)
    )
    return it_dir


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of `tokens` [batch, seq] (causal, positions 0..seq-1)."""
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    out = model(tokens, pos, None)
    return out.float()
