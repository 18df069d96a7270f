"""FP8 GEMMs for the torch grouped experts (`--moe-expert-backend torch` with `--fp8-format`).

Recipe (row-wise activations, per-expert weights; quantizers in fp8_quant.py):
  forward  out = x @ W^T per expert: x e4m3 with one scale per token, W e4m3 with one scale per
           expert, `torch._scaled_grouped_mm`, BF16 out.
  dgrad    dx = dy @ W: dy e4m3 per token; W's quantization is the forward's, transposed (qt),
           so one weight quantization serves both GEMMs. e4m3 rather than e5m2 for gradients:
           the kernel accepts only e4m3, and a scale per token already fits each row's range.
  wgrad    dW[g] = dy_g^T x_g in BF16 from the unquantized operands (one `torch._grouped_mm`
           with the offsets along the token axis): per-token scales lie along the contraction
           axis of this product, so they cannot be factored out of it.
Weights are quantized once per optimizer step, not per call: the quantization is cached per
parameter under (storage, version, iteration), and the module's `on_iteration_end` (called once
per optimizer step by the training loop, mcore/iteration.py) advances the iteration, so gradient
accumulation and activation recomputation reuse it. The version catches in-place changes outside
the loop (a plain torch optimizer, loading a checkpoint); Megatron's optimizer writes the weights
through `.data` views that leave it unchanged, hence the iteration.

Without an FP8-capable GPU `emulate=True` runs the same quantization with a float32 matmul (CPU
tests); the default refuses with a sentence naming the fix.
"""

from __future__ import annotations

import itertools
from typing import Tuple

import torch

from megatron_moe_ext.experts.fp8_quant import quantize_rows, quantize_weight
from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP, _looped_mm
from megatron_moe_ext.mcore.iteration import IterationState

_optimizer_steps = itertools.count()
_current_step = [next(_optimizer_steps)]


def new_optimizer_step(*_args) -> None:
    """Invalidate every cached weight quantization (after each optimizer step; benchmarks that
    drive the layer without the training loop call it themselves)."""
    _current_step[0] = next(_optimizer_steps)


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm(aq, a_scale, bq_t, b_scale, offs, emulate: bool, out_dtype) -> torch.Tensor:
    """aq [M, K] e4m3 (scale [M]) times, per group g, bq_t[g] [N, K] e4m3 (scale [G], one per
    group) transposed -> [M, N] in out_dtype."""
    g, n, _ = bq_t.shape
    if emulate:
        a = aq.float() * a_scale.unsqueeze(-1)
        b = bq_t.float() * b_scale.view(-1, 1, 1)
        return _looped_mm(a, b, offs).to(out_dtype)
    # the kernel takes row-wise scales for B: the expert's scale repeated over its N columns
    return torch._scaled_grouped_mm(aq, bq_t.transpose(-2, -1), a_scale, b_scale[:, None].expand(g, n).contiguous(),
                                    offs=offs, out_dtype=out_dtype)


class _FP8GroupedMM(torch.autograd.Function):
    """x [T, K], weight [G, N, K] (with its quantization wq [G, N, K], wqt [G, K, N], ws [G]),
    offs [G] int32 -> [T, N] in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, wq, wqt, ws, offs, emulate: bool):
        x = x.contiguous()
        xq, xs = quantize_rows(x)
        out = _scaled_mm(xq, xs, wq, ws, offs, emulate, x.dtype)
        ctx.save_for_backward(x, wqt, ws, offs)
        ctx.emulate = emulate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, wqt, ws, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(x.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gq, gs = quantize_rows(grad_out)
            grad_x = _scaled_mm(gq, gs, wqt, ws, offs, ctx.emulate, x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _wgrad(grad_out, x, offs)
        return grad_x, grad_w, None, None, None, None, None


def _wgrad(grad_out: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grad_out [T, N], x [T, K] -> [G, N, K], block g = grad_out_g^T x_g."""
    size = x.element_size()
    if x.dtype in (torch.bfloat16, torch.float16, torch.float32) and \
            (grad_out.shape[-1] * size) % 16 == 0 and (x.shape[-1] * size) % 16 == 0:
        return torch._grouped_mm(grad_out.t(), x, offs=offs)
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return torch.stack([grad_out[s:e].t() @ x[s:e] for s, e in zip(starts, ends)])


class TorchFP8GroupedMLP(TorchGroupedMLP, IterationState):
    """TorchGroupedMLP with FP8 forward and dgrad GEMMs. `emulate`: quantize/dequantize and
    multiply in float32 (for CPUs and GPUs without FP8; the default refuses them)."""

    def __init__(self, *args, emulate: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.emulate = emulate
        self._weight_fp8 = {}

    def on_iteration_end(self, iteration: int) -> None:
        new_optimizer_step()

    def quantized_weight(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """weight [G, N, K] -> (q [G, N, K], qt [G, K, N], scale [G]), once per optimizer step."""
        key = (weight.data_ptr(), weight._version, _current_step[0])
        hit = self._weight_fp8.get(id(weight))
        if hit is None or hit[0] != key:
            hit = (key, quantize_weight(weight))
            self._weight_fp8[id(weight)] = hit
        return hit[1]

    def grouped_mm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not self.emulate and not fp8_supported(x.device):
            raise RuntimeError("--moe-expert-backend torch with FP8 needs an FP8-capable GPU (Hopper "
                               "or newer); drop --fp8-format or run on such a GPU.")
        wq, wqt, ws = self.quantized_weight(weight)
        return _FP8GroupedMM.apply(x, weight, wq, wqt, ws, offs, self.emulate)
