"""ScMoE/DGMoE blocks: EP=world gives the same outputs and gradients as EP=1, same global weights.

Run: torchrun --nproc-per-node N tests/dist/scmoe_ep_equivalence.py OUT.json MODE POLICY TOPK [dedup]
Each rank runs its own tokens at EP=N and at EP=1. Outputs and input gradients must match per rank;
parameter gradients match after summing the EP=1 gradients over ranks (at EP=N every rank's tokens
reach the owning rank's experts, and the replicated parameters' gradients are summed here too).
"""

import sys

import torch

import common  # noqa: F401  (enables the CPU compatibility layer first)
from common import dist, init_distributed, init_model_parallel, write_result
from scmoe_common import causal_mask, global_grads, scmoe_block, scmoe_config, set_global_weights

SEQ, BATCH = 6, 2
PATTERN = [0, 1, 0, 1]


def run(ep: int, mode: str, policy: str, topk: int, dedup: bool, x, dy):
    init_model_parallel(ep=ep)
    cfg = scmoe_config(mode, PATTERN, moe_router_topk=topk, moe_router_pre_softmax=topk == 1)
    block = scmoe_block(mode, cfg, router_policy=policy, dedup=dedup)
    set_global_weights(block, seed=5)
    x = x.clone().requires_grad_(True)
    y = block(hidden_states=x, attention_mask=causal_mask(SEQ))
    (y * dy).sum().backward()
    grads = global_grads(block)
    if ep == 1:  # what the EP=N ranks hold: every rank's contribution, summed
        for g in grads.values():
            dist.all_reduce(g)
    else:  # replicated (non-expert) parameters: sum the ranks' contributions as DP would
        for name, g in grads.items():
            if "local_experts" not in name:
                dist.all_reduce(g)
    return y.detach(), x.grad, grads


def main() -> None:
    out_path, mode, policy, topk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dedup = len(sys.argv) > 5 and sys.argv[5] == "dedup"
    init_distributed()
    rank, ws = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SEQ, BATCH, 16, generator=g)
    dy = torch.randn(SEQ, BATCH, 16, generator=g)
    y_n, dx_n, g_n = run(ws, mode, policy, topk, dedup, x, dy)
    y_1, dx_1, g_1 = run(1, mode, policy, topk, dedup, x, dy)
    diffs = {
        "output": (y_n - y_1).abs().max(),
        "input_grad": (dx_n - dx_1).abs().max(),
        "param_grad": max((g_n[k] - g_1[k]).abs().max() for k in g_n),
        "output_scale": y_1.abs().max(),
        "params_compared": torch.tensor(float(len(g_n))),
    }
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in diffs.values()])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    write_result(out_path, {"world_size": ws, "mode": mode, "policy": policy, "topk": topk,
                            "dedup": dedup, **{k: float(v) for k, v in zip(diffs, t)}})
    dist.barrier()


if __name__ == "__main__":
    main()
