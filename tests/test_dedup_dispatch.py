"""The rank-deduplicating dispatcher: same outputs and gradients as Megatron's alltoall dispatcher
with fewer rows, on EP=2 and EP=4 gloo ranks (real MoELayer, SequentialMLP experts)."""

import pytest
import torch

from megatron_moe_ext.routing.dedup import local_slices, rank_rows


def test_rank_rows_hand_case():
    # E=4 over ep=2 (rank 0: experts 0,1; rank 1: experts 2,3)
    rmap = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    rows = rank_rows(rmap, 2)
    assert rows.rows_per_rank.tolist() == [2, 2]
    assert rows.token.tolist() == [0, 1, 1, 2] and rows.rank.tolist() == [0, 0, 1, 1]
    probs = torch.arange(12.0).view(3, 4)
    assert local_slices(probs, rows, 2).tolist() == [[0, 1], [4, 5], [6, 7], [10, 11]]


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_dedup_equals_stock_alltoall(torchrun_json, nproc):
    r = torchrun_json("dedup_dispatch_equivalence.py", nproc)
    assert r["world_size"] == nproc
    for case in ("top2", "top4", "drop_cf1"):
        c = r[case]
        assert c["output_scale"] > 0.5
        # Each expert sees the same rows in the same order; only the sum of a token's expert
        # outputs happens in a different place, so differences stay at fp32 rounding (~1e-7).
        assert c["output"] <= 1e-6 and c["input_grad"] <= 1e-6 and c["param_grad"] <= 1e-6, case
        assert c["dedup_rows"] == c["distinct_token_rank_pairs"], case
        assert c["dedup_rows"] <= c["stock_rows"], case
    assert r["top4"]["dedup_rows"] < 0.8 * r["top4"]["stock_rows"]


def test_one_ep_rank_keeps_megatrons_dispatcher(megatron_cpu):
    """At EP 1 every row stays on the rank: nothing to deduplicate, so DedupMoELayer keeps
    Megatron's alltoall dispatcher (the same function, fewer host reads)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.spec_utils import get_submodules

    from megatron_moe_ext.mcore.dispatch import DedupMoELayer

    cfg = megatron_cpu.moe_config(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall")
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=4, moe_grouped_gemm=False).mlp)
    layer = DedupMoELayer(cfg, subs)
    assert type(layer.token_dispatcher) is MoEAlltoAllTokenDispatcher
