"""PolicyRouter keeps Megatron's routing semantics around a replaced selection: with plain top-k
as the policy it matches TopKRouter exactly (probs, map, aux/z-loss gradients, capacity dropping,
expert-bias counts), on the real Megatron classes."""

import pytest
import torch


def _routers(common, **cfg_kw):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.mcore.router import PolicyRouter

    class TopKPolicy(PolicyRouter):
        def select_indices(self, scores):
            return torch.topk(scores, self.topk, dim=1).indices

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    cfg = common.moe_config(num_moe_experts=8, moe_router_topk=3, **cfg_kw)
    pg = get_default_pg_collection()
    stock, ours = TopKRouter(config=cfg, pg_collection=pg), TopKPolicy(config=cfg, pg_collection=pg)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("cfg_kw", [
    dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3),
    dict(moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="seq_aux_loss"),
    dict(moe_aux_loss_coeff=1e-2, moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
    dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
         moe_router_load_balancing_type="none", moe_router_topk_scaling_factor=2.5),
    dict(moe_aux_loss_coeff=1e-2, moe_router_pre_softmax=True),
    # (Not with expert bias: there the stock balance loss counts an unbiased top-k, ours counts
    # the experts actually chosen, on purpose.)
    dict(moe_router_score_function="sqrtsoftplus",
         moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-2),
])
def test_topk_policy_equals_topk_router(megatron_cpu, cfg_kw):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    torch.manual_seed(0)
    stock, ours = _routers(megatron_cpu, **cfg_kw)
    if stock.expert_bias is not None:  # non-zero bias so that it changes the selection
        bias = torch.randn_like(stock.expert_bias) * 0.3
        stock.expert_bias.copy_(bias)
        ours.expert_bias.copy_(bias)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    x = torch.randn(16, 2, 16)
    outs = []
    for r in (stock, ours):
        r.train()
        xi = x.clone().requires_grad_(True)
        probs, rmap = r(xi)
        (probs * torch.arange(probs.shape[1], dtype=probs.dtype)).sum().backward()
        outs.append((probs.detach(), rmap, xi.grad, r.weight.grad.clone(),
                     None if r.local_tokens_per_expert is None else r.local_tokens_per_expert.clone()))
    (p0, m0, gx0, gw0, c0), (p1, m1, gx1, gw1, c1) = outs
    assert torch.equal(m0, m1)
    torch.testing.assert_close(p1, p0, rtol=0, atol=0)
    # Same ops in the same order: gradients (including aux/z-loss terms) agree to fp32 rounding.
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-7)
    if c0 is not None:
        assert torch.equal(c0, c1)
