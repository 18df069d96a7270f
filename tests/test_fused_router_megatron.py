"""--moe-router-kernel fused inside Megatron's router: the same experts, probabilities, aux loss
and router-weight gradient (through the probabilities and the attached switch loss) as Megatron's
own TopKRouter for top-k, and as the unfused plugin router for C2R and LocMoE's bias; in this
process the kernel's torch reference runs (no CUDA), in a child process under TRITON_INTERPRET=1
the Triton kernels themselves. Tolerance 1e-5 relative (float32, another order of the sums), and
1e-6 absolute on the router-weight gradient."""

import functools
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(REPO, "tests", "dist")


def _routers(common, policy: str):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.router import C2RRouter, LocMoERouter, TopKPolicyRouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    torch.manual_seed(0)   # the router weights: the same case every run
    cfg = common.moe_config(num_moe_experts=16, moe_router_topk=2, moe_aux_loss_coeff=1e-2,
                            moe_router_pre_softmax=policy == "locmoe", moe_router_topk_scaling_factor=None)
    pg = get_default_pg_collection()
    extra = {"c2r": dict(c2r_layout_ep=8, c2r_top_t=3), "locmoe": dict(locmoe_local_bias=0.5, ranks_per_node=1),
             "topk": {}}[policy]
    cls = {"topk": TopKPolicyRouter, "c2r": C2RRouter, "locmoe": LocMoERouter}[policy]
    fused = functools.partial(cls, ext_cfg=MoEExtConfig(router_policy=policy, router_kernel="fused", **extra))(
        config=cfg, pg_collection=pg)
    if policy == "topk":
        plain = TopKRouter(config=cfg, pg_collection=pg)
    else:
        plain = functools.partial(cls, ext_cfg=MoEExtConfig(router_policy=policy, **extra))(config=cfg, pg_collection=pg)
    plain.load_state_dict(fused.state_dict(), strict=False)
    for r in (fused, plain):
        r.set_layer_number(1)
        r.train()
    if policy == "locmoe":   # EP 1 has one node: fake two so the bias selects something
        for r in (fused, plain):
            r.locality_mask.copy_(torch.arange(16) < 8)
    return fused, plain


def check(common, policy: str) -> None:
    fused, plain = _routers(common, policy)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 4, fused.config.hidden_size, generator=g)
    w = torch.randn(96, 16, generator=g)
    out = {}
    for name, r in (("fused", fused), ("plain", plain)):
        r.zero_grad()
        probs, rmap = r(x)
        (probs * w).sum().backward()   # the switch loss is attached to probs: its gradient comes too
        out[name] = (probs.detach(), rmap, r.weight.grad.clone(),
                     r.take_statistics() if policy != "topk" else None)
    assert torch.equal(out["fused"][1], out["plain"][1]), policy
    torch.testing.assert_close(out["fused"][0], out["plain"][0], rtol=1e-5, atol=1e-6)
    # gradients of size ~1e-2, float32 sums over 96 tokens in another order
    torch.testing.assert_close(out["fused"][2], out["plain"][2], rtol=1e-5, atol=1e-6)
    # LocMoE's statistics (the locality KL's sum and count), from the loss kernel on the fused path
    if policy != "topk":   # (Megatron's TopKRouter keeps none)
        torch.testing.assert_close(out["fused"][3], out["plain"][3], rtol=1e-5, atol=1e-7)
    if policy == "locmoe":
        assert out["fused"][3][1] == 1.0 and out["fused"][3][0] > 0


@pytest.mark.parametrize("policy", ["topk", "c2r", "locmoe"])
def test_fused_router_equals_megatrons(megatron_cpu, policy):
    check(megatron_cpu, policy)


_CHILD = """
import sys, torch, torch.distributed as dist
sys.path[:0] = [{dist!r}, {tests!r}]
import common
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
common.init_model_parallel(ep=1)
import test_fused_router_megatron as t
import megatron_moe_ext.kernels.fused_router as fr
seen = []
real = fr._FusedSelect.apply
fr._FusedSelect.apply = lambda *a: seen.append(1) or real(*a)
import megatron_moe_ext.kernels.locality_loss as ll
kl_seen = []
real_kl = ll._ScaledLocalityKL.apply
ll._ScaledLocalityKL.apply = lambda *a: kl_seen.append(1) or real_kl(*a)
for policy in ("topk", "c2r", "locmoe"):
    t.check(common, policy)
assert len(seen) == 3, seen   # the fused router's forward ran the kernel, once per policy
assert len(kl_seen) == 1, kl_seen   # and LocMoE's fused router its locality-loss kernel
print("ok")
"""


def test_fused_router_kernels_inside_megatron():
    """The same checks with the Triton kernels interpreted (a child process: the interpreter is
    chosen when Triton compiles)."""
    pytest.importorskip("triton")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = _CHILD.format(dist=DIST, tests=os.path.join(REPO, "tests"), port=port)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.dist
def test_pretrain_with_the_fused_router_kernel(tmp_path):
    """The flag reaches every MoE layer's router through the plugin's entry (EP 2, gloo): C2R
    trains with --moe-router-kernel fused to the losses of Megatron's path (CPU: the kernel's
    torch reference; 1e-4 relative over 4 iterations, float32 in another order). Top-k's router
    class under the flag: the next test; its numerics: the in-process tests above."""
    from conftest import pretrain_cpu, train_losses

    losses = {}
    for name, extra in (("c2r", []), ("c2r-fused", ["--moe-router-kernel", "fused"])):
        log = tmp_path / f"{name}.jsonl"
        pretrain_cpu(tmp_path, tmp_path / f"ckpt-{name}", log, "--moe-router-policy", "c2r", *extra,
                     train_iters=4)
        losses[name] = train_losses(log)
    assert len(losses["c2r"]) == 4
    for it, v in losses["c2r"].items():
        assert losses["c2r-fused"][it] == pytest.approx(v, rel=1e-4), it


def test_the_flag_builds_a_policy_router_for_topk():
    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.router import TopKPolicyRouter
    from megatron_moe_ext.mcore.specs import router_class_for

    assert router_class_for(MoEExtConfig()) is None   # Megatron's TopKRouter, untouched
    built = router_class_for(MoEExtConfig(router_kernel="fused"))
    assert built.func is TopKPolicyRouter and built.keywords["ext_cfg"].router_kernel == "fused"
