"""DedupMoELayer vs the stock MoELayer (alltoall), same weights and inputs, on EP = world size.

Run: torchrun --nproc-per-node N tests/dist/dedup_dispatch_equivalence.py OUT.json
Cases: dropless top-2 and top-4 of 8 experts, and token dropping at capacity factor 1.0. Rank 0
writes the largest output/gradient differences and the rows each dispatcher sent.
"""

import sys

import torch

import common  # noqa: F401  (enables the CPU compatibility layer first)
from common import (dist, global_moe_weights, init_distributed, init_model_parallel,
                    load_moe_weights, moe_config, write_result)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import get_submodules

from megatron_moe_ext.mcore.dispatch import DedupMoELayer
from megatron_moe_ext.routing.volume import COUNT_FIELDS, dispatch_counts

CASES = {
    "top2": dict(moe_router_topk=2),
    "top4": dict(moe_router_topk=4),
    "drop_cf1": dict(moe_router_topk=2, moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
}


def run(layer_cls, cfg_kw, weights, x, dy):
    cfg = moe_config(num_moe_experts=8, gated_linear_unit=True, moe_aux_loss_coeff=1e-2, **cfg_kw)
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=8, moe_grouped_gemm=False).mlp)
    layer = layer_cls(cfg, subs)
    layer.train()
    load_moe_weights(layer, weights)
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    (y * dy).sum().backward()
    d = layer.token_dispatcher
    sent = sum(d.input_splits) if isinstance(d.input_splits, list) else int(torch.as_tensor(d.input_splits).sum())
    grads = [layer.router.weight.grad] + [p.grad for p in layer.experts.parameters()]
    # distinct (token, rank) pairs counted independently, by the metrics code
    pairs = dispatch_counts(d.routing_map, ep_size=d.ep_size, ep_ranks_per_node=d.ep_size,
                            src_ep_rank=0)[COUNT_FIELDS.index("rank_rows")]
    return y.detach(), x.grad, grads, sent, int(pairs)


def main() -> None:
    out_path = sys.argv[1]
    init_distributed()
    ws = dist.get_world_size()
    init_model_parallel(ep=ws)
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    result = {"world_size": ws}
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own tokens
    for name, kw in CASES.items():
        weights = global_moe_weights(moe_config(num_moe_experts=8, gated_linear_unit=True), seed=3)
        x = torch.randn(12, 2, 16, generator=g)
        dy = torch.randn(12, 2, 16, generator=g)
        y0, dx0, g0, sent0, _ = run(MoELayer, kw, weights, x, dy)
        y1, dx1, g1, sent1, pairs = run(DedupMoELayer, kw, weights, x, dy)
        diffs = torch.stack([(y1 - y0).abs().max(), (dx1 - dx0).abs().max(),
                             max((a - b).abs().max() for a, b in zip(g1, g0)),
                             y0.abs().max()]).double()
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        rows = torch.tensor([sent0, sent1, pairs], dtype=torch.float64)
        dist.all_reduce(rows)
        result[name] = {"output": float(diffs[0]), "input_grad": float(diffs[1]),
                        "param_grad": float(diffs[2]), "output_scale": float(diffs[3]),
                        "stock_rows": int(rows[0]), "dedup_rows": int(rows[1]),
                        "distinct_token_rank_pairs": int(rows[2])}
    write_result(out_path, result)
    dist.barrier()


if __name__ == "__main__":
    main()
