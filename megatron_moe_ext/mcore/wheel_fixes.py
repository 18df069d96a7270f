"""Fixes for running `megatron.training` from the megatron-core wheel (not a Megatron-LM checkout).

`initialize_megatron` compiles the dataset index helper with `make` in
`megatron/core/datasets`; the wheel ships the compiled `helpers_cpp` extension but no Makefile,
so stock `pretrain()` exits with "Failed to compile the C++ dataset helper functions" on every
machine, GPU included. When the compiled helper imports and there is nothing to build, the
compile step becomes a no-op. A checkout with its Makefile is left alone.
"""

from __future__ import annotations

import importlib.util
import os


def apply_wheel_fixes() -> None:
    """Idempotent; safe to call before or after megatron.training is imported."""
    from megatron.core.datasets import utils as dataset_utils

    here = os.path.dirname(dataset_utils.__file__)
    if os.path.exists(os.path.join(here, "Makefile")):
        return
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return  # nothing compiled either: let Megatron report it

    def compile_helpers() -> None:
        """The wheel's prebuilt helpers_cpp is used; there is nothing to compile."""

    dataset_utils.compile_helpers = compile_helpers
