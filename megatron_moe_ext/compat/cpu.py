"""Run the real Megatron-Core 0.19 classes on CPU with the gloo backend.

Megatron-Core assumes CUDA in many small places (the list, with file:line, is in section 6 of the
extension map): `torch.cuda.current_device()` used as a device, streams and events in the
all-to-all dispatcher, split sizes left as tensors on CPU, `device="cuda"` in the default causal
mask and throughout `megatron.training`, the CUDA RNG tracker, and an unguarded `triton` import.

`enable_cpu_compat()` makes those work on a CPU-only machine so tests and the CPU quickstart run
Megatron's own MoELayer, GPTModel and the whole `pretrain()` loop (EP=2 over 2 gloo ranks
included) instead of a re-implementation. It is explicit and refuses to run where CUDA is usable:
on a GPU machine nothing here is ever active.

What it does:
  * `torch.cuda` stand-ins: streams/events become no-ops, `current_device()` reports the CPU,
    `device_count()` reports 1 (Megatron skips model-parallel initialisation with 0 devices), RNG
    state functions use the CPU generator, memory statistics read 0.
  * a `TorchFunctionMode` that rewrites every `device="cuda"`, `.cuda()` and `.to("cuda")` to the
    CPU: `megatron.training`, the optimizer and DDP do this about a hundred times.
  * torch.compile disabled (Megatron's `jit_fuser` helpers then run eagerly);
  * the all-to-all split sizes turned into lists (the dispatcher leaves them tensors on CPU);
  * list all-gather and reduce-scatter of unequal row counts (expert TP > 1), which gloo lacks;
  * the patches on Megatron itself, scopes "cpu" and "always" of `compat/megatron_0_19.py` (the
    triton-only paged-stash module, CPU RNG state for recomputation and checkpoints, JIT fusion
    options, `initialize_megatron(allow_no_cuda=True)`, the wheel's `compile_helpers`, ...).
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


class CpuCompatError(RuntimeError):
    """Raised when the CPU compatibility layer is asked for where it must not run."""


def cpu_compat_enabled() -> bool:
    """True once `enable_cpu_compat()` ran in this process."""
    return _ENABLED


def enable_cpu_compat() -> None:
    """Make Megatron-Core 0.19's CUDA assumptions work on a CPU-only process. Idempotent.

    Call before importing `megatron` (the triton stub must be in place first); calling later still
    works for everything but the stub. Raises CpuCompatError when CUDA is available, because every
    patch here would silently move GPU work to the CPU.
    """
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise CpuCompatError(
            "enable_cpu_compat() is for CPU-only machines; CUDA is available here, so run Megatron "
            "on the GPU without the compatibility layer."
        )
    # Megatron wraps small helpers in torch.compile (`jit_fuser`); with torch.cuda patched, inductor
    # picks CUDA codegen and fails, and compiling for the CPU would only add start-up time.
    import torch._dynamo.config as dynamo_config

    dynamo_config.disable = True
    # Megatron asserts this with TP > 1 (it orders CUDA kernel launches for TP communication
    # overlap); there is no CUDA device here, so the value only satisfies the check.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _patch_torch_cuda()
    _patch_all_to_all_splits()
    _patch_uneven_collectives()
    _DeviceToCpuMode().__enter__()  # stays pushed for the life of the process
    _ENABLED = True
    _patch_megatron_modules()  # imports megatron, so after the torch.cuda stand-ins


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, *a: Any, **k: Any) -> None: ...
    def wait_event(self, *a: Any, **k: Any) -> None: ...
    def record_event(self, event: Any = None) -> "_NoOpStream":
        return event or _NoOpStream()
    def record(self, *a: Any, **k: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True
    def wait(self, *a: Any, **k: Any) -> None: ...
    def elapsed_time(self, other: Any) -> float:
        return 0.0
    def __enter__(self) -> "_NoOpStream":
        return self
    def __exit__(self, *exc: Any) -> None: ...


class _NoOpEvent(_NoOpStream):
    """A distinct class: torch._dynamo's rule map rejects one object under two torch.cuda names."""


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _fresh(fn):
    """A new function object per patched name, for the same reason as _NoOpEvent."""
    return lambda *args, **kwargs: fn(*args, **kwargs)


def _patch_torch_cuda() -> None:
    c = torch.cuda
    c.Stream = _NoOpStream
    c.Event = _NoOpEvent
    c.current_stream = lambda *a, **k: _NoOpStream()
    c.default_stream = lambda *a, **k: _NoOpStream()
    c.stream = lambda *a, **k: _NoOpStream()
    for name in ("set_stream", "synchronize", "empty_cache", "set_device",
                 "reset_peak_memory_stats", "reset_max_memory_allocated"):
        setattr(c, name, _fresh(_noop))
    c.current_device = lambda: _CPU
    # Megatron skips model-parallel initialisation when it sees no device.
    c.device_count = lambda: 1
    c.is_initialized = lambda: True
    c.is_current_stream_capturing = lambda: False
    # The CUDA RNG state becomes the CPU generator's: checkpoints then round-trip it.
    c.get_rng_state = lambda device=None: torch.get_rng_state()
    c.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    c.get_rng_state_all = lambda: [torch.get_rng_state()]
    c.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seeding the CPU generator here
    # would recurse, and there is no other generator to seed.
    c.manual_seed = _fresh(_noop)
    c.manual_seed_all = _fresh(_noop)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved", "device_memory_used"):
        setattr(c, name, _fresh(lambda *a, **k: 0))
    c.memory_stats = lambda *a, **k: {}
    c.get_device_name = lambda *a, **k: "cpu"
    c.get_device_capability = lambda *a, **k: (0, 0)
    # validate_args asks for the architecture with TP > 1 and sequence parallelism
    c.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        name="cpu", major=0, minor=0, total_memory=0, multi_processor_count=0)
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_all_to_all_splits() -> None:
    """On CPU the dispatcher's split sizes stay tensors (its DtoH copy runs only for CUDA
    tensors); `all_to_all_single` needs lists."""
    dist = torch.distributed
    original = dist.all_to_all_single
    if getattr(original, "_moe_ext_wrapped", False):
        return

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    all_to_all_single._moe_ext_wrapped = True
    dist.all_to_all_single = all_to_all_single


def _patch_uneven_collectives() -> None:
    """Megatron's expert-TP path (alltoall dispatcher with --expert-tensor-parallel-size > 1)
    all-gathers and reduce-scatters rows of unequal counts per rank, as lists of tensors; NCCL
    takes those, gloo does not. Same results: pad to the largest, gather, copy back; all-reduce
    the whole and keep this rank's part."""
    dist = torch.distributed
    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter
    if getattr(all_gather, "_moe_ext_wrapped", False):
        return

    @functools.wraps(all_gather)
    def all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list}
        if async_op or (len(shapes) == 1 and tuple(tensor.shape) in shapes):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(out, padded, group=group)
        for dst, src in zip(tensor_list, out):
            dst.copy_(src[: dst.shape[0]])
        return None

    @functools.wraps(reduce_scatter)
    def reduce_scatter_uneven(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        # gloo has no list reduce-scatter at all: all-reduce and slice, equal sizes or not
        whole = torch.cat([t.reshape(t.shape[0], -1) for t in input_list])
        dist.all_reduce(whole, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(whole[start: start + output.shape[0]].reshape(output.shape))
        return None

    all_gather_uneven._moe_ext_wrapped = True
    dist.all_gather = all_gather_uneven
    dist.reduce_scatter = reduce_scatter_uneven


# --------------------------------------------------------------------------------------------
# device rewriting


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # Bare ints mean CUDA ordinals for `device=` arguments.
    return isinstance(dev, int) and not isinstance(dev, bool)


class _DeviceToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments, `.cuda()` and `.to("cuda")` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if "pin_memory" in kwargs:
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# megatron


def _patch_megatron_modules() -> None:
    """The patches on Megatron itself live in megatron_0_19.py (scopes "cpu" and "always")."""
    from megatron_moe_ext.compat.megatron_0_19 import apply_patches

    # "cpu" first: it holds the paged-stash stub, which must precede any import of megatron.
    apply_patches("cpu")
    apply_patches("always")


def reset_rng_tracker_for_cpu() -> None:
    """Local attention forks the model-parallel CUDA RNG on every forward; the inference tracker
    makes `add`/`fork` no-ops, which is what a CPU run needs (no per-rank CUDA generators).
    Not a patch: Megatron's own API, called after each (re)initialisation of model parallelism."""
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
