"""FP8 forward GEMMs for the torch grouped experts (`--moe-expert-backend torch` with `--fp8-format`).

Forward: activations quantized per row (token), weights per output channel, both to float8_e4m3fn
with scale = amax / 448, then `torch._scaled_grouped_mm` (Hopper) with float32 row-wise scales and
BF16 output. Backward: both gradients in BF16 from the unquantized tensors (dgrad = dY W,
wgrad = dY^T X per expert, each one `torch._grouped_mm`); FP8 backward is left for later (it
needs transposed quantization of dY and X). Without an FP8-capable GPU, `emulate=True` runs the
same quantization with a float32 matmul, so the quantization and the autograd wiring are tested
on CPU; the kernel itself is compared with the emulation on the GPU (benchmarks/moe_layer.py).
"""

from __future__ import annotations

import torch

from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP, _looped_mm

E4M3_MAX = 448.0


def quantize_rows(t: torch.Tensor):
    """t [..., K] -> (float8_e4m3fn [..., K], float32 scales [...]) with t ~ q * scale per row."""
    amax = t.detach().abs().amax(dim=-1).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (t.float() / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _FP8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offs, emulate: bool):
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(weight)  # [G, N, K] -> scales [G, N]: per output channel
        if emulate:
            deq_x = xq.float() * xs.unsqueeze(-1)
            deq_w = wq.float() * ws.unsqueeze(-1)
            out = _looped_mm(deq_x, deq_w, offs).to(x.dtype)
        else:
            out = torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs=offs,
                                           out_dtype=x.dtype)
        ctx.save_for_backward(x, weight, offs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if grad_out.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.dtype == grad_out.dtype:
            grad_x = torch._grouped_mm(grad_out, weight, offs=offs)
            grad_w = torch._grouped_mm(grad_out.t(), x, offs=offs)
        else:
            grad_x = _looped_mm(grad_out, weight.transpose(-2, -1), offs)
            sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
            grad_w = torch.stack([g.t() @ xi for g, xi in zip(torch.split(grad_out, sizes),
                                                               torch.split(x, sizes))])
        return grad_x, grad_w, None, None


class TorchFP8GroupedMLP(TorchGroupedMLP):
    """TorchGroupedMLP with FP8 forward GEMMs. `emulate`: quantize/dequantize and multiply in
    float32 (for CPUs and GPUs without FP8; the default refuses them with a clear error)."""

    def __init__(self, *args, emulate: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.emulate = emulate

    def grouped_mm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not self.emulate and not fp8_supported(x.device):
            raise RuntimeError("--moe-expert-backend torch with FP8 needs an FP8-capable GPU (Hopper "
                               "or newer); drop --fp8-format or run on such a GPU.")
        return _FP8GroupedMM.apply(x, weight, offs, self.emulate)
