"""Stock Megatron MoELayer: EP=world gives the same output and gradients as EP=1, same weights.

Run: torchrun --nproc-per-node N tests/dist/moe_ep_equivalence.py OUT.json [dispatcher]
Each rank owns a slice of the tokens; the EP=1 pass on every rank runs all tokens through all
experts. Rank 0 writes the largest differences to OUT.json.
"""

import sys

import torch

import common  # noqa: F401  (enables the CPU compatibility layer first)
from common import (dist, global_moe_weights, init_distributed, init_model_parallel,
                    load_moe_weights, moe_config, write_result)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import get_submodules

SEQ, BATCH_PER_RANK = 6, 2
LAYER_KW = dict(gated_linear_unit=True)  # SwiGLU-style experts, as most MoE models use


def run(ep: int, x_all: torch.Tensor, dy_all: torch.Tensor, weights, dispatcher: str):
    """Forward+backward on this rank's slice (ep > 1) or on all tokens (ep == 1)."""
    init_model_parallel(ep=ep)
    cfg = moe_config(moe_token_dispatcher_type=dispatcher, **LAYER_KW)
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=cfg.num_moe_experts,
                                                         moe_grouped_gemm=False).mlp)
    layer = MoELayer(cfg, subs)
    load_moe_weights(layer, weights)
    rank = dist.get_rank()
    sl = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK) if ep > 1 else slice(None)
    x = x_all[:, sl].clone().requires_grad_(True)
    y, _ = layer(x)
    (y * dy_all[:, sl]).sum().backward()
    router_grad = layer.router.weight.grad.clone()
    if ep > 1:  # each rank's router saw only its own tokens
        dist.all_reduce(router_grad)
    expert_grads = {
        e: (layer.experts.local_experts[i].linear_fc1.weight.grad.clone(),
            layer.experts.local_experts[i].linear_fc2.weight.grad.clone())
        for i, e in enumerate(layer.local_expert_indices)
    }
    return y.detach(), x.grad, router_grad, expert_grads


def main() -> None:
    out_path = sys.argv[1]
    dispatcher = sys.argv[2] if len(sys.argv) > 2 else "alltoall"
    init_distributed()
    rank, ws = dist.get_rank(), dist.get_world_size()
    init_model_parallel(ep=ws)
    weights = global_moe_weights(moe_config(**LAYER_KW), seed=7)
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(SEQ, BATCH_PER_RANK * ws, 16, generator=g)
    dy_all = torch.randn(SEQ, BATCH_PER_RANK * ws, 16, generator=g)

    y_ep, dx_ep, dr_ep, dexp_ep = run(ws, x_all, dy_all, weights, dispatcher)
    y_1, dx_1, dr_1, dexp_1 = run(1, x_all, dy_all, weights, dispatcher)
    sl = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    diffs = {
        "output": (y_ep - y_1[:, sl]).abs().max(),
        "input_grad": (dx_ep - dx_1[:, sl]).abs().max(),
        "router_grad": (dr_ep - dr_1).abs().max(),
        "expert_grad": max(max((a - b).abs().max() for a, b in zip(dexp_ep[e], dexp_1[e]))
                           for e in dexp_ep),
        "output_scale": y_1.abs().max(),
    }
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in diffs.values()])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    write_result(out_path, {"world_size": ws, "dispatcher": dispatcher,
                            **{k: float(v) for k, v in zip(diffs, t)}})
    dist.barrier()


if __name__ == "__main__":
    main()
