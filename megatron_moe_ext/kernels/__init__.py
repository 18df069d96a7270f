"""GPU kernels and their plain-torch references (no Megatron): each kernel beside the reference
its tests compare it with, on CUDA and, for the Triton ones, on CPU under TRITON_INTERPRET=1."""
