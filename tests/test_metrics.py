"""Dispatch accounting against hand-counted cases."""

import pytest
import torch

from megatron_moe_ext.routing.volume import (
    dispatch_counts,
    dispatch_volume,
    volume_from_counts,
)


def _map(rows, E=8):
    m = torch.zeros(len(rows), E, dtype=torch.bool)
    for t, experts in enumerate(rows):
        m[t, experts] = True
    return m


def test_hand_counted_ep4_two_nodes():
    # E=8 over ep=4: rank r holds experts {2r, 2r+1}; 2 EP ranks per node: node 0 = ranks {0,1}.
    rmap = _map([[0, 1, 2],    # token 0 (from rank 0): ranks 0,0,1 -> 3 pairs, 2 ranks
                 [4, 6, 7],    # token 1 (from rank 0): ranks 2,3,3 -> 3 pairs, 2 ranks
                 [2, 3, 5]])   # token 2 (from rank 1): ranks 1,1,2 -> 3 pairs, 2 ranks
    src = torch.tensor([0, 0, 1])
    stock = dispatch_volume(rmap, ep_size=4, ep_ranks_per_node=2, src_ep_rank=src, dedup=False,
                            hidden_size=10, bytes_per_element=2)
    dedup = dispatch_volume(rmap, ep_size=4, ep_ranks_per_node=2, src_ep_rank=src, dedup=True)
    # stock: remote pairs: t0 -> 1 (expert 2), t1 -> 3, t2 -> 1 (expert 5) = 5; inter-node:
    # t0 none, t1 all 3 (ranks 2,3), t2 expert 5 (rank 2) = 4.
    assert stock.rows_per_token == pytest.approx(9 / 3)
    assert stock.remote_rows_per_token == pytest.approx(5 / 3)
    assert stock.inter_node_rows_per_token == pytest.approx(4 / 3)
    assert stock.bytes_per_token == pytest.approx(3 * 20)
    # dedup: (t, rank) pairs: t0 {0,1}, t1 {2,3}, t2 {1,2}; remote: t0 {1}, t1 {2,3}, t2 {2} = 4;
    # inter-node: t1 {2,3}, t2 {2} = 3.
    assert dedup.rows_per_token == pytest.approx(6 / 3) == dedup.distinct_ranks_per_token
    assert dedup.remote_rows_per_token == pytest.approx(4 / 3)
    assert dedup.inter_node_rows_per_token == pytest.approx(3 / 3)
    assert dedup.stock_rows_per_token == stock.rows_per_token
    # load: experts 0..7 chosen [1,1,2,1,1,1,1,1] times out of 9
    assert dedup.expert_load == pytest.approx([1 / 9, 1 / 9, 2 / 9] + [1 / 9] * 5)
    loads = torch.tensor([1, 1, 2, 1, 1, 1, 1, 1.0])
    assert dedup.load_cv == pytest.approx(float(loads.std(unbiased=False) / loads.mean()))


def test_single_node_has_no_inter_node_rows_and_local_tokens_no_remote():
    rmap = _map([[0, 1], [6, 7]])
    v = dispatch_volume(rmap, ep_size=4, ep_ranks_per_node=4, src_ep_rank=torch.tensor([0, 3]),
                        dedup=True)
    assert (v.rows_per_token, v.remote_rows_per_token, v.inter_node_rows_per_token) == (1.0, 0.0, 0.0)


def test_counts_add_up_over_batches_and_placement_is_respected():
    torch.manual_seed(0)
    a, b = torch.rand(50, 8) > 0.7, torch.rand(30, 8) > 0.7
    kw = dict(ep_size=2, ep_ranks_per_node=1, src_ep_rank=1)
    summed = dispatch_counts(a, **kw) + dispatch_counts(b, **kw)
    assert torch.equal(summed, dispatch_counts(torch.cat([a, b]), **kw))
    # Moving every expert to the token's own rank makes everything local.
    local = dispatch_counts(a, ep_size=2, ep_ranks_per_node=1, src_ep_rank=1,
                            expert_to_rank=torch.ones(8, dtype=torch.long))
    v = volume_from_counts(local, dedup=True)
    assert v.remote_rows_per_token == 0 and v.distinct_ranks_per_token <= 1
