"""Megatron flag sets for the model shapes the plugin's quickstart, tests and examples use."""

from __future__ import annotations

from typing import List


def tiny_moe_flags(*, num_layers: int = 4, hidden: int = 128, experts: int = 8, topk: int = 2,
                   ep: int = 2, seq_length: int = 128, heads: int = 4,
                   ffn_hidden: int | None = None) -> List[str]:
    """A small Llama-style GPT-MoE (RMSNorm, RoPE, SwiGLU experts, no biases) on the alltoall
    dispatcher; every layer is MoE. Model only: data, schedule and logging flags come separately."""
    ffn = ffn_hidden or 2 * hidden
    return [
        "--num-layers", str(num_layers), "--hidden-size", str(hidden),
        "--num-attention-heads", str(heads), "--ffn-hidden-size", str(ffn),
        "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--num-experts", str(experts), "--moe-router-topk", str(topk),
        "--moe-ffn-hidden-size", str(ffn), "--expert-model-parallel-size", str(ep),
        "--moe-token-dispatcher-type", "alltoall", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "1e-2", "--moe-router-dtype", "fp32",
    ]
