"""What every single-GPU benchmark here needs: Megatron's process groups on one rank, and CUDA-event
timing (warm-up, then the median of many steps)."""

from __future__ import annotations

import os
import statistics
from typing import Callable

import torch


def init_single_gpu_megatron(port: int) -> None:
    """One NCCL rank, TP = PP = EP = 1, Megatron's model-parallel RNG seeded."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1)


def median_ms(step: Callable[[int], None], iters: int, warmup: int) -> float:
    """Median over `iters` calls of step(i) (after `warmup` untimed ones), CUDA events, in ms."""
    events = []
    for i in range(warmup + iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(i)
        b.record()
        if i >= warmup:
            events.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)
