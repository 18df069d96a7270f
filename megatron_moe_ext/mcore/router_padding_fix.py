"""Fix for Megatron-Core 0.19's router padding for FP8 (`--moe-router-padding-for-quantization`).

The alltoall dispatcher pads the router's routing map to the FP8 alignment with
`moe_utils.pad_routing_map`, which writes into the map it is given (`routing_map[mask] = 1` on a
transposed view). That map is the router's output, and with `--moe-router-fusion` Transformer
Engine's fused top-k saved it for its backward, so every FP8 step fails in backward with
"one of the variables needed for gradient computation has been modified by an inplace
operation" (reproduced on an H100: docs/performance.md). Padding a copy leaves the router's
tensor as autograd saved it; the padded result is the same.
"""

from __future__ import annotations

import torch


def pad_routing_map_out_of_place(routing_map: torch.Tensor, pad_multiple: int) -> torch.Tensor:
    """`moe_utils.pad_routing_map` on a copy: [T, E] bool -> padded [T, E] bool; input unchanged."""
    from megatron.core.transformer.moe import moe_utils

    return moe_utils.pad_routing_map(routing_map.clone(), pad_multiple)


def apply_router_padding_fix() -> None:
    """Idempotent: the dispatcher module's reference to the padding function pads a copy."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.pad_routing_map = pad_routing_map_out_of_place
