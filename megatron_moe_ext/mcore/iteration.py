"""Per-iteration state of the plugin's modules, advanced once per optimizer step.

Routers that learn or switch something while training (C2R's warm-up freeze, LocMoE's local-bias
switch and capacity estimate, LocMoE+'s capacity re-estimate) and the FP8 experts' weight cache
implement `IterationState.on_iteration_end`. The training loop calls `end_iteration(model, it)`
on every rank after each optimizer step (training/run_hooks.py; torchtitan updates its expert
bias the same way, outside the forward). Nothing of this changes inside a forward, so a
recomputed forward sees what the first forward saw, and evaluation changes no state.
"""

from __future__ import annotations

from typing import Iterable

import torch


class IterationState:
    """Mixin for modules with state that advances once per optimizer step."""

    def on_iteration_end(self, iteration: int) -> None:
        """Called on every rank after the optimizer step of `iteration` (1-based, Megatron's
        count). Collectives are allowed: every rank holding the module reaches this call."""


def end_iteration(model: Iterable[torch.nn.Module], iteration: int) -> None:
    """Advance every IterationState module of `model` (a list of model chunks) past `iteration`."""
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, IterationState):
                module.on_iteration_end(iteration)
