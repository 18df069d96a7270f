"""LocMoE: locality loss, GrAP gate, capacity bound (float64 references), and the router on real
Megatron classes."""

import math

import mpmath
import pytest
import torch

from megatron_moe_ext.config import MoEExtConfig
from megatron_moe_ext.routing.locality import (
    capacity_factor_from_bound,
    capacity_lower_bound,
    grap_gate_weight,
    locality_loss,
    localized_distribution,
)
from megatron_moe_ext.routing.topology import EPTopology


def _stats(router):
    from megatron_moe_ext.mcore.router import STAT_FIELDS

    return dict(zip(STAT_FIELDS, router.take_statistics().tolist()))


def test_node_local_mask():
    # 8 experts, EP 4 (2 per rank), 2 EP ranks per node: rank 3 is on node 1 = ranks {2, 3}
    assert EPTopology(8, 4, 2).node_local_mask(3).tolist() == [False] * 4 + [True] * 4
    assert EPTopology(8, 4, 4).node_local_mask(0).all()


def test_locality_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]], dtype=torch.float64)
    local = torch.tensor([True, True, False, False])
    eps = 0.1
    # D_c = (0.6, 0.2, 0.1, 0.1); D_l = (0.45, 0.45, 0.05, 0.05)
    d_c = [0.6, 0.2, 0.1, 0.1]
    d_l = [0.45, 0.45, 0.05, 0.05]
    expected = sum(c * math.log(c / l) for c, l in zip(d_c, d_l))
    assert locality_loss(probs, local, eps=eps).item() == pytest.approx(expected, rel=1e-12)
    assert localized_distribution(local, eps).tolist() == pytest.approx(d_l)


def test_locality_loss_pushes_mass_to_local_experts_and_is_finite():
    torch.manual_seed(0)
    logits = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    local = EPTopology(8, 2, 1).node_local_mask(0)
    loss = locality_loss(torch.softmax(logits, -1), local, eps=1e-6)
    assert torch.isfinite(loss)
    loss.backward()
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
        before = torch.softmax(logits, -1)[:, local].sum(1).mean()
        after = torch.softmax(stepped, -1)[:, local].sum(1).mean()
    assert after > before + 1e-3
    # gradient sign: it raises local logits relative to remote ones
    assert (logits.grad[:, local].mean() < 0) and (logits.grad[:, ~local].mean() > 0)
    # fully local routing is a (near) minimum: tiny loss
    concentrated = torch.zeros(4, 8, dtype=torch.float64)
    concentrated[:, :4] = 0.25
    assert locality_loss(concentrated, local, eps=1e-6).item() < 1e-5


def test_grap_gate_is_exactly_block_orthogonal():
    w = grap_gate_weight(8, 64, torch.float64)
    gram = w @ w.t()
    assert torch.equal(gram, torch.diag(torch.diagonal(gram)))
    assert torch.allclose(torch.diagonal(gram), torch.full((8,), 8 / 64, dtype=torch.float64))
    x = torch.randn(5, 64, dtype=torch.float64)
    assert torch.allclose(x @ w.t(), x.view(5, 8, 8).mean(-1))
    with pytest.raises(ValueError, match="divisible"):
        grap_gate_weight(8, 60)


@pytest.mark.parametrize("delta,d,n", [(0.03, 5120, 16), (0.03, 4096, 8), (0.05, 4096, 8), (0.2, 64, 4)])
def test_capacity_bound_matches_float64_reference(delta, d, n):
    b = capacity_lower_bound(delta, d, n)
    # independent reference: p = P(|cos| >= delta) on the unit sphere in R^d, by numerical
    # integration of the density of cos theta: c (1 - t^2)^((d-3)/2)
    mpmath.mp.dps = 30
    dens = lambda t: (1 - t ** 2) ** ((d - 3) / 2)  # noqa: E731
    p = 2 * mpmath.quad(dens, [delta, 1]) / mpmath.quad(dens, [-1, 1])
    assert b.beta_form == pytest.approx(float(1 / (n * p)), rel=1e-9)
    # the erfc form approximates it for large d (within 15% at d >= 4096 here)
    if d >= 4096:
        assert b.erfc_form == pytest.approx(b.beta_form, rel=0.15)


def test_capacity_bound_paper_figures_and_clamp():
    # the methods doc's erfc evaluations: d=5120, n=16, delta=0.03 -> 1.97; d=4096, n=8 -> 2.28
    assert capacity_lower_bound(0.03, 5120, 16).erfc_form == pytest.approx(1.97, abs=0.01)
    assert capacity_lower_bound(0.03, 4096, 8).erfc_form == pytest.approx(2.28, abs=0.01)
    huge = capacity_lower_bound(0.1, 4096, 8).beta_form
    factor, clamped = capacity_factor_from_bound(huge, num_tokens=4096, topk=2, num_experts=8,
                                                 max_capacity_factor=1.25)
    assert clamped and factor == 1.25
    factor, clamped = capacity_factor_from_bound(512.0, num_tokens=4096, topk=2, num_experts=8,
                                                 max_capacity_factor=1.25)
    assert not clamped and factor == pytest.approx(0.5)


def test_locmoe_router_on_megatron(megatron_cpu):
    import functools

    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_moe_ext.mcore.router import LocMoERouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2)
    for gate in ("learned", "grap"):
        ext = MoEExtConfig(router_policy="locmoe", locmoe_mu=0.5, locmoe_gate=gate)
        r = functools.partial(LocMoERouter, ext_cfg=ext)(config=cfg, pg_collection=get_default_pg_collection())
        r.set_layer_number(1)
        r.train()
        assert torch.equal(r.weight.detach(), grap_gate_weight(8, 16))
        assert r.weight.requires_grad == (gate == "learned")
        x = torch.randn(16, 2, 16, requires_grad=True)
        probs, rmap = r(x)
        assert rmap.sum(1).eq(2).all()
        probs.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        # EP=1: every expert is local, KL(D_c || uniform) >= 0 is recorded
        st = _stats(r)
        assert st["locality_kl_count"] == 1 and st["locality_kl_sum"] >= 0


def test_capacity_bound_drops_through_megatron_capacity_path(megatron_cpu):
    import functools

    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_moe_ext.mcore.router import LocMoERouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2,
                                  moe_expert_capacity_factor=1.25)
    ext = MoEExtConfig(router_policy="locmoe", locmoe_capacity="bound")
    r = functools.partial(LocMoERouter, ext_cfg=ext)(config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    r.train()
    probs, rmap = r(torch.randn(64, 1, 16))
    st = _stats(r)
    factor = st["capacity_factor_sum"]
    assert st["capacity_factor_count"] == 1 and 0 < factor <= 1.25
    capacity = math.ceil(64 * 2 / 8 * factor)
    assert (rmap.sum(0) <= capacity).all()
    assert rmap.sum() < 64 * 2  # with d=16 the bound is small: tokens are dropped
    r.on_iteration_end(1)  # the estimate advances once per optimizer step, not per forward
    assert 0 < r.locmoe_delta.item() < 1


@pytest.mark.dist
def test_locmoe_pretrain_ep2_two_nodes(tmp_path):
    from conftest import pretrain_cpu, run_log_rows

    log = tmp_path / "loc.jsonl"
    pretrain_cpu(tmp_path, tmp_path / "ckpt", log, "--moe-router-policy", "locmoe",
                 "--moe-locmoe-mu", "1.0", "--moe-ranks-per-node", "1")
    rows = [r for r in run_log_rows(log) if r["kind"] == "train"]
    assert len(rows) == 8
    for r in rows:
        assert math.isfinite(r["lm loss"]) and math.isfinite(r["moe_ext/locality_kl"])
        assert r["moe_ext/locality_kl"] > 0  # two nodes: remote experts carry mass
        assert r["moe_ext/inter_node_rows_per_token"] == r["moe_ext/remote_rows_per_token"]


def test_token_choice_and_expert_choice_against_loops():
    from megatron_moe_ext.routing.locality import (
        expert_choice_keep,
        token_choice_lengths,
    )

    g = torch.Generator().manual_seed(5)
    aff = torch.rand(40, 6, generator=g) * 2 - 0.5
    lengths = token_choice_lengths(aff, 3, 0.7)
    for t in range(40):
        pos = sorted((v for v in aff[t].tolist() if v > 0), reverse=True)
        total, acc, want = sum(pos), 0.0, 3
        for i, v in enumerate(sorted(aff[t].tolist(), reverse=True)[:3]):
            acc += max(v, 0.0)
            if acc >= 0.7 * total - 1e-12:
                want = i + 1
                break
        assert lengths[t] == want, t
    proposed = torch.rand(40, 6, generator=g) > 0.5
    keep = expert_choice_keep(aff, proposed, 4)
    for e in range(6):
        cands = [t for t in range(40) if proposed[t, e]]
        best = set(sorted(cands, key=lambda t: -aff[t, e].item())[:4])
        assert set(keep[:, e].nonzero().flatten().tolist()) == best


def test_locmoe_plus_router_truncates_and_logs(megatron_cpu, monkeypatch):
    import functools

    import megatron.core.num_microbatches_calculator as nmc

    monkeypatch.setattr(nmc, "get_num_microbatches", lambda: 1)

    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_moe_ext.mcore.router import LocMoEPlusRouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2,
                                  moe_expert_capacity_factor=0.5)
    ext = MoEExtConfig(router_policy="locmoe-plus", locmoe_plus_tau=0.9)
    r = functools.partial(LocMoEPlusRouter, ext_cfg=ext)(config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    r.train()
    x = torch.randn(64, 1, 16, requires_grad=True)
    probs, rmap = r(x)
    capacity = math.ceil(64 * 2 / 8 * 0.5)
    assert (rmap.sum(0) <= capacity).all() and (rmap.sum(1) <= 2).all()
    assert torch.equal(probs != 0, rmap)
    dropped = float((rmap.sum(1) == 0).sum())
    st = _stats(r)
    assert st["dropped_tokens"] == dropped > 0 and st["routed_tokens"] == 64
    probs.sum().backward()
    assert torch.isfinite(x.grad).all()
    # re-estimation: at d=16 the resonance bound is tiny, so the capacity falls to it
    ext.locmoe_plus_reestimate_interval = 2
    r(torch.randn(64, 1, 16))
    r.on_iteration_end(2)
    assert r.resonance_capacity is not None and 1 <= r.resonance_capacity <= capacity


@pytest.mark.dist
def test_locmoe_plus_pretrain_ep2(tmp_path):
    from conftest import pretrain_cpu, run_log_rows

    log = tmp_path / "plus.jsonl"
    pretrain_cpu(tmp_path, tmp_path / "ckpt", log, "--moe-router-policy", "locmoe-plus",
                 "--moe-expert-capacity-factor", "1.0", "--moe-locmoe-plus-reestimate-interval", "4",
                 "--moe-ranks-per-node", "1")
    rows = [r for r in run_log_rows(log) if r["kind"] == "train"]
    assert len(rows) == 8
    for r in rows:
        assert math.isfinite(r["lm loss"]) and 0 <= r["moe_ext/dropped_token_fraction"] < 1
        # never above the capacity-factor capacity: ceil(128 tokens x 2 / 4 experts x 1.0) = 64
        assert r["moe_ext/expert_capacity"] >= 1 and r["moe_ext/expert_capacity"] <= 64
        assert r["moe_ext/rows_per_token"] <= 2.0
    # after the first re-estimate (iteration 4) the capacity is the resonance bound, below cf's
    assert rows[-1]["moe_ext/expert_capacity"] <= rows[0]["moe_ext/expert_capacity"]


def test_local_bias_moves_selection_to_local_experts_only(megatron_cpu, monkeypatch):
    """With EP=1 every expert is local, so fake a two-node mask: the bias then shifts selection
    toward the node's experts while the probabilities keep the unbiased score function."""
    import functools

    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_moe_ext.mcore.router import LocMoERouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2)
    x = torch.randn(256, 1, 16)
    local = torch.tensor([True] * 4 + [False] * 4)
    shares = []
    for bias in (0.0, 0.05, 10.0):
        ext = MoEExtConfig(router_policy="locmoe", locmoe_local_bias=bias)
        r = functools.partial(LocMoERouter, ext_cfg=ext)(config=cfg, pg_collection=get_default_pg_collection())
        r.set_layer_number(1)
        r.locality_mask.copy_(local)
        r.train()
        probs, rmap = r(x)
        shares.append(float(rmap[:, local].sum() / rmap.sum()))
        lg = r.gating(x.view(-1, 16)).detach()
        t = 0
        idx = rmap[t].nonzero().flatten()
        torch.testing.assert_close(probs[t, idx].detach(), torch.softmax(lg[t, idx], 0))
    assert shares[0] < shares[1] < shares[2] == 1.0


def test_local_bias_waits_for_its_warmup(megatron_cpu):
    """--moe-locmoe-local-bias-warmup-steps W: unbiased top-k for W iterations (x micro-batches),
    then the bias; the counter is checkpointed and evaluation forwards do not advance it."""
    import functools

    from megatron.core import num_microbatches_calculator as nmc
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_moe_ext.mcore.router import LocMoERouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=1e-2)
    local = torch.tensor([True] * 4 + [False] * 4)
    ext = MoEExtConfig(router_policy="locmoe", locmoe_local_bias=10.0, locmoe_local_bias_warmup_steps=2)
    r = functools.partial(LocMoERouter, ext_cfg=ext)(config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    r.locality_mask.copy_(local)
    x = torch.randn(256, 1, 16)
    with torch.no_grad():
        unbiased = torch.topk(r.gating(x.view(-1, 16)), 2, dim=1).indices.sort(1).values
    # 3 micro-batches per iteration: global batch 6, micro-batch 1, data-parallel 2
    nmc.init_num_microbatches_calculator(0, None, 6, 1, 2)
    try:
        r.eval()
        with torch.no_grad():
            r(x)
        assert int(r.locmoe_bias_on) == 0
        r.train()
        for iteration in (1, 2):
            for _ in range(nmc.get_num_microbatches()):
                _, rmap = r(x)
                assert torch.equal(rmap.nonzero()[:, 1].view(-1, 2).sort(1).values, unbiased)
            r.on_iteration_end(iteration)  # the training loop's once-per-step hook
        assert "locmoe_bias_on" in r.state_dict()
        _, rmap = r(x)
    finally:
        nmc.destroy_num_microbatches_calculator()
    assert rmap[:, ~local].sum() == 0 and rmap.sum() == 2 * 256   # bias 10: every pick local


def test_offline_locmoe_policy_picks_what_the_biased_router_picks(megatron_cpu):
    """comm-volume --policy locmoe --local-bias B on a trace must reproduce the router's choices:
    the trace holds unbiased logits, the router adds B to its node's experts."""
    import functools

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_ext.mcore.router import LocMoERouter
    from megatron_moe_ext.routing.policies.locmoe import offline_route
    from megatron_moe_ext.routing.policies.offline import OfflineContext
    from megatron_moe_ext.routing.scores import indices_to_map

    def locmoe_policy(logits, k, bias):
        return offline_route(logits, k, OfflineContext(EPTopology(8, 2, 1), src, {"local_bias": bias}))

    cfg = megatron_cpu.moe_config(num_moe_experts=8, moe_router_topk=2)
    ext = MoEExtConfig(router_policy="locmoe", locmoe_local_bias=0.3)
    r = functools.partial(LocMoERouter, ext_cfg=ext)(config=cfg, pg_collection=get_default_pg_collection())
    logits = torch.randn(512, 8)
    src = torch.cat([torch.zeros(256, dtype=torch.long), torch.ones(256, dtype=torch.long)])
    pairs = EPTopology(8, 2, 1).node_local_mask(src)   # EP 2, one rank per node: experts 0-3 | 4-7
    assert pairs[:256, :4].all() and not pairs[:256, 4:].any() and pairs[256:, 4:].all()
    offline = locmoe_policy(logits, 2, 0.3)
    for rank, rows in ((0, slice(0, 256)), (1, slice(256, 512))):
        r.locality_mask.copy_(pairs[rows][0])      # the router on that rank
        online = r.select_indices(r.selection_scores(logits[rows]))
        assert torch.equal(indices_to_map(online, 8), offline[rows])
    unbiased = locmoe_policy(logits, 2, 0.0)
    assert (offline != unbiased).any()


def test_ep_ranks_per_node_follow_expert_tp_not_attention_tp():
    """Megatron's expert mesh orders ranks expert-TP fastest, then EP: with 4 GPUs per node,
    expert TP 1 puts 4 EP ranks on a node (whatever the attention TP), expert TP 2 puts 2."""
    from megatron_moe_ext.routing.topology import EPTopology

    assert EPTopology.from_gpus(8, 8, 4, expert_tp_size=1).ranks_per_node == 4
    assert EPTopology.from_gpus(8, 8, 4, expert_tp_size=2).ranks_per_node == 2
    assert EPTopology.from_gpus(8, 2, 1, expert_tp_size=2).ranks_per_node == 1
