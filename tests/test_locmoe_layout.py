"""--moe-locmoe-layout-ep N: LocMoE at EP 1 emulating EP N's token sources (the one-GPU study).

Sample b of a micro-batch of B samples stands on source rank b // (B / N); the locality loss is
the mean over the N sources of each one's KL(D_c || D_l), the local bias follows each token's
source node, and the routing trace records the sources so `comm-volume --ep N` counts traffic
from where the router thought the tokens were."""

import functools
from types import SimpleNamespace

import pytest
import torch

from megatron_moe_ext.config import MoEExtConfig, MoEExtConfigError
from megatron_moe_ext.routing.locality import localized_distribution, locality_kl, locality_loss
from megatron_moe_ext.routing.topology import EPTopology


def test_grouped_locality_kl_is_the_mean_of_each_sources_loss():
    """Against the one-source loss applied to each source's tokens alone (float64), with padding,
    for the value and the gradient."""
    g = torch.Generator().manual_seed(3)
    E, V, T = 16, 8, 512
    topo = EPTopology(E, V, 4)
    masks = topo.node_local_mask(torch.arange(V))                          # [V, E]
    logits = torch.randn(T, E, generator=g, dtype=torch.float64, requires_grad=True)
    src = torch.randint(0, V, (T,), generator=g)
    valid = torch.rand(T, generator=g) > 0.1
    probs = torch.softmax(logits, -1)
    got = locality_kl(probs, torch.log(localized_distribution(masks, 1e-3)), valid=valid, sources=src)
    ref = sum(locality_loss(probs[src == v], masks[v], eps=1e-3, valid=valid[src == v]) for v in range(V)) / V
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-14)
    for v in range(V):   # [V, E] D_l rows are the one-rank D_l
        torch.testing.assert_close(localized_distribution(masks, 1e-3)[v], localized_distribution(masks[v], 1e-3))


def _router(megatron_cpu, **ext):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection

    from megatron_moe_ext.mcore.router import LocMoERouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    cfg = megatron_cpu.moe_config(num_moe_experts=16, moe_router_topk=2, moe_aux_loss_coeff=1e-2)
    r = functools.partial(LocMoERouter, ext_cfg=MoEExtConfig(router_policy="locmoe", **ext))(
        config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    return r


def test_router_biases_each_sample_toward_its_emulated_node(megatron_cpu):
    """EP 8 emulated on 2 nodes of 4 ranks (16 experts, 2 per rank): with a large bias every
    token of samples 0-3 picks experts 0-7, of samples 4-7 experts 8-15; the locality loss is
    the per-source mean; without the layout (EP 1) every expert is local and the bias moves
    nothing."""
    S, B, H = 32, 8, 16
    x = torch.randn(S, B, H)
    r = _router(megatron_cpu, locmoe_local_bias=10.0, locmoe_layout_ep=8, ranks_per_node=4)
    r.train()
    src = r.token_sources(x)
    assert torch.equal(src.view(S, B), torch.arange(B).expand(S, B))   # one sample per source rank
    _, rmap = r(x)
    node_of_token = (src // 4).view(-1, 1)                                  # [T, 1]
    node_of_expert = torch.arange(16) // 8
    picked = rmap.nonzero()
    assert len(picked) == 2 * S * B
    assert torch.equal(node_of_expert[picked[:, 1]], node_of_token[picked[:, 0], 0])
    plain = _router(megatron_cpu, locmoe_local_bias=10.0, ranks_per_node=4)
    plain.load_state_dict(r.state_dict())
    assert plain.token_sources(x) is None and plain.locality_mask.all()


def test_router_locality_loss_uses_the_sources(megatron_cpu, monkeypatch):
    import megatron_moe_ext.routing.locality as loc

    seen = {}
    real = loc.locality_kl

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(loc, "locality_kl", spy)
    r = _router(megatron_cpu, locmoe_layout_ep=8, ranks_per_node=4)
    r.train()
    r(torch.randn(8, 8, 16))
    assert seen["sources"] is not None and seen["sources"].shape == (64,)
    assert r._log_d_l.shape == (8, 16)


def test_parse_time_refusals():
    from megatron_moe_ext.args import check_with_megatron

    def check(**over):
        a = dict(num_experts=16, moe_router_topk=2, expert_model_parallel_size=1, world_size=1,
                 micro_batch_size=8, hidden_size=64, moe_expert_capacity_factor=None)
        a.update(over)
        cfg = MoEExtConfig(router_policy="locmoe", locmoe_layout_ep=8, ranks_per_node=4)
        check_with_megatron(cfg, SimpleNamespace(**a))

    check()
    with pytest.raises(MoEExtConfigError, match="--micro-batch-size to a multiple of 8"):
        check(micro_batch_size=4)
    with pytest.raises(MoEExtConfigError, match="--expert-model-parallel-size 1"):
        check(expert_model_parallel_size=2, world_size=2)
    with pytest.raises(MoEExtConfigError, match="must divide --num-experts 12"):
        check(num_experts=12, hidden_size=48)
    with pytest.raises(MoEExtConfigError, match="positive EP size"):
        MoEExtConfig(router_policy="locmoe", locmoe_layout_ep=0).validate()


def test_comm_volume_counts_from_the_recorded_sources(tmp_path, megatron_cpu, capsys):
    """A trace recorded by the emulating router carries its sources, and `comm-volume --ep 8`
    counts from them: logits that favour each token's own (emulated) node send nothing across
    nodes from the recorded sources, and about half their rows from contiguous blocks."""
    import json

    from megatron_moe_ext.cli import main as cli
    from megatron_moe_ext.files.trace import load_trace, save_trace

    S, B = 64, 8
    r = _router(megatron_cpu, locmoe_layout_ep=8, ranks_per_node=4)
    x = torch.randn(S, B, 16)
    src = r.token_sources(x)
    logits = torch.randn(S * B, 16) + 10.0 * r.locality_mask[src]
    meta = dict(iteration=1, num_experts=16, topk=2, ep_size=1, ep_rank=0, ep_ranks_per_node=4)
    save_trace(tmp_path / "with" / "routing_trace_iter0000001_rank00000.pt",
               {1: {"logits": logits, "layout_ep": 8, "layout_src": src}}, **meta)
    save_trace(tmp_path / "without" / "routing_trace_iter0000001_rank00000.pt", {1: logits}, **meta)
    assert load_trace(tmp_path / "with").layout_ep == 8 and load_trace(tmp_path / "without").layout_ep is None
    figures = {}
    for name, rpn in (("with", []), ("without", ["--ranks-per-node", "4"])):
        capsys.readouterr()   # the layout trace's nodes are its own (4 ranks per node) by default
        assert cli(["comm-volume", "--trace", str(tmp_path / name), "--ep", "8", *rpn, "--json"]) == 0
        figures[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "source ranks its router emulated" in figures["with"]["source"]
    assert figures["with"]["ranks_per_node"] == 4 and figures["with"]["inter_node_rows_per_token"] == 0
    assert 0.7 < figures["without"]["inter_node_rows_per_token"] < 1.3   # 2 rows, half on the other node
