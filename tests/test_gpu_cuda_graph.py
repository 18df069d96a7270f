"""The MoE layer the plugin runs at EP = 1 (DeviceSplitsMoELayer, torch BF16 experts; Megatron's
router and the fused router kernel) captured in a CUDA graph, forward and backward, replays to what
the eager layer computes on the same weights and fresh inputs: the capture itself fails if
anything in the layer reads to the host (issue 16). The graph is benchmarks/moe_layer.py's.

    pytest -m gpu -rs tests/test_gpu_cuda_graph.py     (on the GPU machine: benchmarks/run_gpu_tests.sh)

Tolerance: BF16 parameters and activations; cuBLAS/CUTLASS may choose other kernels inside a
graph, and reductions may run in another order, so outputs and gradients agree to a few BF16 ulps
(2^-8 relative each), not to the bit: max |graph - eager| <= 2e-2 x max |eager|.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (CUDA graphs)")]

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SHAPE = dict(hidden=1024, ffn=512, experts=16, topk=4, glu=True)


@pytest.fixture(scope="module")
def moe_layer_bench():
    sys.path.insert(0, BENCH)
    import moe_layer
    from gpu_setup import init_single_gpu_megatron

    if not torch.distributed.is_initialized():
        init_single_gpu_megatron(port=29517)
    return moe_layer


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("kernel", ["megatron", "fused", "locmoe-fused"])
def test_graphed_layer_replays_the_eager_layer(moe_layer_bench, kernel):
    """locmoe-fused: LocMoE's router with the fused kernel, its node-local bias and its locality
    loss from the kernel's score sums (the loss's log D_l once moved a CPU tensor per forward)."""
    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer, DeviceSplitsTokenDispatcher
    from megatron_moe_ext.mcore.router import LocMoERouter, TopKPolicyRouter

    router = {"megatron": None,
              "fused": functools.partial(TopKPolicyRouter, ext_cfg=MoEExtConfig(router_kernel="fused")),
              "locmoe-fused": functools.partial(LocMoERouter, ext_cfg=MoEExtConfig(
                  router_policy="locmoe", router_kernel="fused", locmoe_local_bias=0.5))}[kernel]
    build = functools.partial(moe_layer_bench.build, SHAPE, "torch bf16", router=router, fused=False,
                              layer_cls=DeviceSplitsMoELayer)
    graphed, eager = build(), build()
    eager.load_state_dict(graphed.state_dict())
    assert type(graphed.token_dispatcher) is DeviceSplitsTokenDispatcher
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = [(torch.randn(2048, 1, SHAPE["hidden"], device="cuda", dtype=torch.bfloat16, generator=g),
             torch.randn(2048, 1, SHAPE["hidden"], device="cuda", dtype=torch.bfloat16, generator=g))
            for _ in range(3)]
    step = moe_layer_bench.graphed_layer_step(graphed, pool)
    y_graph, x_graph = step.outputs
    for i in (1, 2, 0):   # replays on inputs other than the captured one
        step(i)
        x = pool[i][0].detach().clone().requires_grad_(True)
        eager.zero_grad(set_to_none=True)
        y, _ = eager(x)
        y.backward(pool[i][1])
        torch.cuda.synchronize()
        assert _rel(y_graph, y) <= 2e-2 and _rel(x_graph.grad, x.grad) <= 2e-2, i
        for (name, p_graph), p in zip(graphed.named_parameters(), eager.parameters()):
            assert p_graph.grad is not None and _rel(p_graph.grad, p.grad) <= 2e-2, (i, name)


def test_dispatch_counts_capture_in_a_graph():
    """The metrics hook's per-forward counts (routing/volume.py) hold no host-to-device copy: the
    full-iteration CUDA graph of a training step captures them (a Python int made a tensor with
    torch.as_tensor failed that capture on the H200). Exact: integer counts in float64."""
    from megatron_moe_ext.routing.volume import dispatch_counts

    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(4096, 16, device="cuda", generator=g)
    rmap = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(4, dim=1).indices, True)
    kw = dict(ep_size=4, ep_ranks_per_node=2, src_ep_rank=1)
    eager = dispatch_counts(rmap, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dispatch_counts(rmap, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dispatch_counts(rmap, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
