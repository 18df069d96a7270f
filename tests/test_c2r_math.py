"""C2R math: co-activation, partner lists, constrained selection, placement, plan files."""

import itertools
import json

import pytest
import torch

from megatron_moe_ext.files.plan import Plan, PlanError, load_plan, save_plan
from megatron_moe_ext.routing.collaboration import (
    coactivation_counts,
    default_partner_lists,
    partner_lists,
    specialization_metrics,
)
from megatron_moe_ext.routing.placement import (
    balanced_placement,
    expert_to_slot_from_ranks,
    intra_rank_fraction,
    random_placement,
)
from megatron_moe_ext.routing.policies.c2r import c2r_select
from megatron_moe_ext.routing.topology import EPTopology


def test_coactivation_counts_hand_case():
    rmap = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    c = coactivation_counts(rmap)
    expected = torch.tensor([[3, 2, 1, 0], [2, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(c, expected)
    m = specialization_metrics(c)
    # expert 0's partners: 1 twice, 2 once -> p = (2/3, 1/3)
    assert m["top_partner_share"][0] == pytest.approx(2 / 3)
    assert m["entropy"][0] == pytest.approx(-(2 / 3) * torch.log(torch.tensor(2 / 3)).item()
                                            - (1 / 3) * torch.log(torch.tensor(1 / 3)).item())
    assert m["partners_for_coverage"][0] == 2 and m["partners_for_coverage"][1] == 1
    assert m["partners_for_coverage"][3] == 0 and m["entropy"][3] == 0


def _reference_c2r(scores, k, partners):
    """Plain loops in float64: top-1 by argmax, then the best k-1 among its partners."""
    out = []
    for row in scores.double():
        top1 = int(row.argmax())
        cands = sorted(partners[top1].tolist(), key=lambda e: -row[e].item())
        out.append({top1, *cands[: k - 1]})
    return out


@pytest.mark.parametrize("E,k,T", [(8, 2, 1), (16, 4, 3), (16, 4, 7), (64, 4, 7), (12, 3, 11)])
def test_c2r_select_matches_reference(E, k, T):
    g = torch.Generator().manual_seed(E * 100 + T)
    scores = torch.randn(300, E, generator=g)
    coact = coactivation_counts(torch.rand(500, E, generator=g) > 0.7)
    partners = partner_lists(coact, T)
    got = c2r_select(scores, k, partners)
    assert got.shape == (300, k)
    assert [set(r.tolist()) for r in got] == _reference_c2r(scores, k, partners)
    assert torch.equal(got[:, 0], scores.argmax(1))


def test_all_partners_is_plain_topk():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(1000, 32, generator=g)
    for partners in (default_partner_lists(EPTopology(32, 4, 4), 31), partner_lists(torch.rand(32, 32, generator=g), 31)):
        got = c2r_select(scores, 4, partners).sort(1).values
        assert torch.equal(got, scores.topk(4, dim=1).indices.sort(1).values)


def test_default_partners_keep_tokens_on_one_rank_up_to_L_minus_1():
    E, ep = 64, 8
    L = E // ep
    p = default_partner_lists(EPTopology(E, ep, ep), L - 1)
    rank = torch.arange(E) // L
    assert torch.equal(rank[p], rank.unsqueeze(1).expand(-1, L - 1))
    # beyond L-1, the next partner is on the next rank (cyclic)
    p2 = default_partner_lists(EPTopology(E, ep, ep), L)
    assert torch.equal(rank[p2[:, -1]], (rank + 1) % ep)
    scores = torch.randn(2000, E)
    chosen = c2r_select(scores, 4, p)
    assert (rank[chosen] == rank[chosen[:, :1]]).all()


def test_co_resident_partner_lists_and_errors():
    coact = torch.rand(8, 8) * 100
    e2r = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    p = partner_lists(coact, 3, expert_to_rank=e2r, co_resident_only=True)
    assert (e2r[p] == e2r.unsqueeze(1)).all()
    with pytest.raises(ValueError, match="co-resident"):
        partner_lists(coact, 4, expert_to_rank=e2r, co_resident_only=True)
    with pytest.raises(ValueError, match="k-1"):
        c2r_select(torch.randn(4, 8), 4, p[:, :2])


def _brute_force_best(c, ep):
    E = c.shape[0]
    L = E // ep
    best = 0.0
    for combo in itertools.permutations(range(E)):
        rank = torch.empty(E, dtype=torch.long)
        rank[list(combo)] = torch.arange(E) // L
        best = max(best, intra_rank_fraction(c, rank))
    return best


@pytest.mark.parametrize("E,ep,seed", [(4, 2, 0), (6, 2, 1), (6, 3, 2), (6, 2, 3)])
def test_placement_finds_optimum_on_tiny_cases(E, ep, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(E, E, generator=g)
    c = a + a.t()
    rank = balanced_placement(c, ep, seed=seed)
    assert torch.bincount(rank, minlength=ep).tolist() == [E // ep] * ep
    assert intra_rank_fraction(c, rank) == pytest.approx(_brute_force_best(c, ep), abs=1e-9)


def test_placement_recovers_planted_blocks():
    E, ep = 32, 4
    g = torch.Generator().manual_seed(0)
    group = torch.randperm(E, generator=g) // (E // ep)             # hidden groups, shuffled labels
    c = torch.where(group.unsqueeze(0) == group.unsqueeze(1), 50.0, 1.0) + torch.rand(E, E, generator=g)
    c = c + c.t()
    rank = balanced_placement(c, ep)
    planned = intra_rank_fraction(c, rank)
    assert planned == pytest.approx(intra_rank_fraction(c, group))
    assert planned > intra_rank_fraction(c, torch.arange(E) // (E // ep)) + 0.3
    assert planned > intra_rank_fraction(c, random_placement(E, ep, seed=1)) + 0.3
    slot = expert_to_slot_from_ranks(rank, ep)
    assert sorted(slot.tolist()) == list(range(E)) and torch.equal(slot // (E // ep), rank)


def _plan(E=8, ep=2, T=3):
    return Plan(E, ep, T, True, {1: torch.arange(E)}, {1: default_partner_lists(EPTopology(E, ep, ep), T)})


def test_plan_round_trip_and_mismatches(tmp_path):
    path = save_plan(tmp_path / "plan.json", _plan(), report={1: {"planned": 0.5}}, profile="p")
    back = load_plan(path, num_experts=8, ep_size=2, topk=4)
    assert torch.equal(back.partners[1], _plan().partners[1]) and back.top_t == 3
    with pytest.raises(PlanError, match=r"plan.json.*8 experts.*16"):
        load_plan(path, num_experts=16)
    with pytest.raises(PlanError, match=r"plan.json.*expert-parallel size 2.*4"):
        load_plan(path, ep_size=4)
    with pytest.raises(PlanError, match=r"top_t 3 is less than k-1 = 4"):
        load_plan(path, topk=5)
    with pytest.raises(PlanError, match="exists"):
        save_plan(path, _plan(), report={}, profile="p")
    notplan = tmp_path / "x.json"
    notplan.write_text(json.dumps({"hello": 1}))
    with pytest.raises(PlanError, match=r"x.json: not a megatron-moe-ext C2R plan"):
        load_plan(notplan)
    garbage = tmp_path / "g.json"
    garbage.write_text("{not json")
    with pytest.raises(PlanError, match="g.json: not a C2R plan file"):
        load_plan(garbage)
