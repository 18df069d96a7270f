"""megatron-moe-ext: communication-efficient expert-parallel MoE for Megatron-Core."""

__version__ = "0.1.0"
