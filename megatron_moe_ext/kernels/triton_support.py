"""Whether the Triton kernels run on a tensor: CUDA tensors, and CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, how the tests run them)."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch's CUDA wheels ship Triton
    triton = tl = None


def use_triton(t: torch.Tensor) -> bool:
    if triton is None:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
