"""The router-padding fix: Megatron's pad_routing_map writes into the router's routing map, which
breaks the backward of any op that saved it (TE's fused top-k does; on CPU, a product with the map stands in
for it). The GPU reproduction with Transformer Engine is in benchmarks/moe_layer.py."""

import pytest
import torch


def test_padding_a_saved_routing_map_breaks_backward_and_the_fix_does_not(megatron_cpu):
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from megatron_moe_ext.compat.megatron_0_19 import patch_named

    fix = patch_named("router-padding-out-of-place")
    was_applied = fix.applied  # the CPU layer applies the "always" patches
    fix.revert()
    try:
        assert token_dispatcher.pad_routing_map is moe_utils.pad_routing_map
        torch.manual_seed(0)
        logits = torch.randn(10, 4, requires_grad=True)
        routing_map = torch.zeros(10, 4, dtype=torch.bool).scatter(1, logits.topk(2, dim=1).indices, True)
        expected = moe_utils.pad_routing_map(routing_map.clone(), 8)
        assert (expected.sum(0) % 8 == 0).all() and expected.sum() > routing_map.sum()

        saved = logits * routing_map  # autograd keeps routing_map for backward
        token_dispatcher.pad_routing_map(routing_map, 8)  # stock: in place
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.sum().backward()

        fix.apply()
        routing_map = torch.zeros(10, 4, dtype=torch.bool).scatter(1, logits.topk(2, dim=1).indices, True)
        before = routing_map.clone()
        saved = logits * routing_map
        padded = token_dispatcher.pad_routing_map(routing_map, 8)
        saved.sum().backward()
        assert torch.equal(padded, expected) and torch.equal(routing_map, before)
    finally:
        fix.revert()
        if was_applied:
            fix.apply()
