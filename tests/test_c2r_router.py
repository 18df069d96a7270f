"""C2RRouter on the real Megatron classes: T = E-1 is exactly TopKRouter; constraints hold; the
warm-up freezes co-resident partners; partners travel in the state dict."""

import functools

import pytest
import torch

from megatron_moe_ext.config import MoEExtConfig


def _make(common, ext_cfg, **cfg_kw):
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.mcore.router import C2RRouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = common.moe_config(num_moe_experts=8, moe_router_topk=3, moe_aux_loss_coeff=1e-2, **cfg_kw)
    pg = get_default_pg_collection()
    stock = TopKRouter(config=cfg, pg_collection=pg)
    ours = functools.partial(C2RRouter, ext_cfg=ext_cfg)(config=cfg, pg_collection=pg)
    ours.load_state_dict(stock.state_dict(), strict=False)
    for r in (stock, ours):
        r.set_layer_number(1)
        r.train()
    return stock, ours


def _run(router, x):
    x = x.clone().requires_grad_(True)
    probs, rmap = router(x)
    (probs * torch.linspace(-1, 1, probs.shape[1])).sum().backward()
    return probs.detach(), rmap, x.grad, router.weight.grad.clone()


@pytest.mark.parametrize("cfg_kw", [{}, {"moe_router_pre_softmax": True},
                                    {"moe_router_score_function": "sigmoid"}])
def test_all_partners_equals_topk_router(megatron_cpu, cfg_kw):
    torch.manual_seed(0)
    stock, ours = _make(megatron_cpu, MoEExtConfig(router_policy="c2r", c2r_top_t=7), **cfg_kw)
    x = torch.randn(32, 2, 16)
    for a, b in zip(_run(stock, x), _run(ours, x)):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_constraint_holds_and_probabilities_follow_the_score_function(megatron_cpu):
    torch.manual_seed(1)
    _, ours = _make(megatron_cpu, MoEExtConfig(router_policy="c2r", c2r_top_t=2))
    partners = ours.c2r_partners
    x = torch.randn(64, 1, 16)
    probs, rmap = ours(x)
    assert rmap.sum(1).eq(3).all()
    lg = ours.gating(x.view(-1, 16)).detach()
    top1 = lg.argmax(1)
    for t in range(64):
        chosen = set(rmap[t].nonzero().flatten().tolist())
        assert int(top1[t]) in chosen
        assert chosen - {int(top1[t])} <= set(partners[top1[t]].tolist())
        # softmax after the top-k over the chosen logits (Megatron's default)
        idx = sorted(chosen)
        torch.testing.assert_close(probs[t, idx].detach(), torch.softmax(lg[t, idx], 0))


def test_warmup_freezes_co_resident_partners_and_state_dict_carries_them(megatron_cpu, monkeypatch):
    import megatron.core.num_microbatches_calculator as nmc

    monkeypatch.setattr(nmc, "get_num_microbatches", lambda: 2)
    torch.manual_seed(2)
    ext = MoEExtConfig(router_policy="c2r", c2r_top_t=2, c2r_warmup_steps=3)
    _, ours = _make(megatron_cpu, ext)
    before = ours.c2r_partners.clone()
    for iteration in (1, 2, 3):  # 3 iterations x 2 micro-batches
        for _ in range(nmc.get_num_microbatches()):
            assert ours.c2r_active.item() == 0
            ours(torch.randn(40, 1, 16))
        ours.on_iteration_end(iteration)  # the training loop's once-per-step hook
    assert ours.c2r_active.item() == 1
    assert not torch.equal(before, ours.c2r_partners)  # profiled, not the default order
    sd = ours.state_dict()
    assert {"c2r_partners", "c2r_active"} <= set(sd)
    _, fresh = _make(megatron_cpu, ext)
    fresh.load_state_dict(sd)
    assert fresh.c2r_active.item() == 1 and torch.equal(fresh.c2r_partners, ours.c2r_partners)


def test_layout_ep_emulates_another_placement_on_one_rank(megatron_cpu, monkeypatch):
    """--moe-c2r-layout-ep 4 at EP 1: the default T, the default partners and the warm-up's
    co-resident partners are EP 4's (2 of the 8 experts per rank), not EP 1's (all 8)."""
    import megatron.core.num_microbatches_calculator as nmc

    from megatron_moe_ext.errors import UserError

    _, plain = _make(megatron_cpu, MoEExtConfig(router_policy="c2r"))
    assert plain.top_t == 7                        # EP 1: every expert co-resident
    _, laid = _make(megatron_cpu, MoEExtConfig(router_policy="c2r", c2r_top_t=2, c2r_layout_ep=4))
    # default lists: the co-resident expert first, then the next rank's
    assert [int(p[0]) for p in laid.c2r_partners] == [e ^ 1 for e in range(8)]
    monkeypatch.setattr(nmc, "get_num_microbatches", lambda: 1)
    # top-3 needs T >= 2: layout EP 2 (4 experts per rank), T = 3 co-resident partners
    ext = MoEExtConfig(router_policy="c2r", c2r_top_t=3, c2r_layout_ep=2, c2r_warmup_steps=1)
    _, warm = _make(megatron_cpu, ext)
    warm(torch.randn(40, 1, 16))
    warm.on_iteration_end(1)
    assert warm.c2r_active.item() == 1
    for e, partners in enumerate(warm.c2r_partners.tolist()):   # exactly its rank-mates
        assert set(partners) == set(range(e // 4 * 4, e // 4 * 4 + 4)) - {e}
    with pytest.raises(ValueError, match="layout-ep"):
        _make(megatron_cpu, MoEExtConfig(router_policy="c2r", c2r_layout_ep=3))
    with pytest.raises(UserError, match="layout-ep"):
        MoEExtConfig(router_policy="c2r", c2r_layout_ep=0).validate()
