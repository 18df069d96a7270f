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


def cuda_graph_problem(ext_cfg, cuda_graph_impl: str, fp8: bool) -> "str | None":
    """The sentence refusing a plugin setting whose forward a CUDA graph would freeze, or None.

    A CUDA graph replays the kernels its capture launched: Python branches and Python numbers in
    a forward are fixed at capture, and forward hooks do not run in a replay. Settings whose
    forward reads state that on_iteration_end changes on the host, or that record through a hook,
    would silently stop changing. (State kept in device tensors, such as LocMoE's local-bias
    switch and the metrics' counts, replays correctly; ScMoE refuses CUDA graphs itself,
    scmoe_spec.scmoe_problem.) `cuda_graph_impl`: Megatron's
    --cuda-graph-impl; `fp8`: whether the model runs FP8 (--fp8-format)."""
    if cuda_graph_impl in (None, "none"):
        return None
    flag = f"--cuda-graph-impl {cuda_graph_impl}"
    if ext_cfg.router_policy == "c2r" and ext_cfg.c2r_warmup_steps:
        return (f"--moe-c2r-warmup-steps switches C2R on after the warm-up in Python, which {flag} "
                "captured earlier would never see; warm up without CUDA graphs and resume from that "
                "checkpoint with them, or start from --moe-c2r-plan.")
    if ext_cfg.router_policy == "locmoe" and ext_cfg.locmoe_capacity == "bound":
        return (f"--moe-locmoe-capacity bound re-estimates the capacity on the host every iteration, "
                f"which {flag} would freeze at its capture; drop one of them.")
    if ext_cfg.router_policy == "locmoe-plus" and ext_cfg.locmoe_plus_reestimate_interval:
        return (f"--moe-locmoe-plus-reestimate-interval changes the capacity on the host, which {flag} "
                "would freeze at its capture; set it to 0 or drop the CUDA graph.")
    if ext_cfg.expert_backend == "torch" and fp8:
        return (f"--moe-expert-backend torch with FP8 caches its quantized weights per optimizer step "
                f"on the host, which {flag} would freeze at its capture; use --moe-expert-backend te "
                "for FP8 with CUDA graphs or drop the CUDA graph.")
    for value, name in ((ext_cfg.save_routing_trace, "--save-routing-trace"),
                        (ext_cfg.profile_collaboration, "--moe-profile-collaboration")):
        if value:
            return (f"{name} records through a forward hook, which does not run when {flag} replays; "
                    "record without CUDA graphs.")
    return None
