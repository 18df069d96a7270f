"""Megatron flag sets the compatibility layer needs: without Transformer Engine, and on CPU."""

from __future__ import annotations

# Megatron without Transformer Engine (or apex): the local transformer implementation and none of
# the fused kernels that need TE/apex. Used on CPU and on GPUs without TE.
LOCAL_IMPL_FLAGS = [
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
]

# Megatron's flags for a CPU run: no TE/apex kernels, no CUDA-only fusions, gloo.
CPU_MEGATRON_FLAGS = LOCAL_IMPL_FLAGS + [
    "--use-cpu-initialization",
    "--distributed-backend", "gloo",
    "--inference-rng-tracker",
    "--no-bias-swiglu-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--clip-grad", "0.0",  # grad-norm clipping asserts CUDA tensors
]

# The same for TransformerConfig built directly (tests).
CPU_TRANSFORMER_CONFIG_KWARGS = dict(
    use_cpu_initialization=True,
    moe_permute_fusion=False,
    moe_router_fusion=False,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
)
