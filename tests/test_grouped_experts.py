"""The torch grouped-GEMM experts (BF16/FP32 and FP8-emulated) against plain references, inside
Megatron's MoELayer against SequentialMLP, and checkpoint interchange with SequentialMLP."""


import pytest
import torch

H, F, E = 16, 32, 4  # widths whose rows are multiples of 16 bytes: torch._grouped_mm's requirement


def _experts(megatron_cpu, glu: bool, dtype=torch.float32, cls=None, **kw):
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cfg = megatron_cpu.moe_config(hidden_size=H, ffn_hidden_size=F, num_moe_experts=E,
                                  gated_linear_unit=glu, params_dtype=dtype,
                                  activation_func=torch.nn.functional.silu if glu else torch.nn.functional.gelu)
    return (cls or TorchGroupedMLP)(E, cfg, **kw)


def _reference(mod, x, tokens_per_expert, probs):
    """float64, one expert at a time, from the module's weights."""
    w1, w2 = mod.linear_fc1.weight.double(), mod.linear_fc2.weight.double()
    out, start = [], 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        xe = x[start:start + n].double()
        h = xe @ w1[e].t()
        if mod.config.gated_linear_unit:
            g, u = h.chunk(2, dim=-1)
            h = mod.config.activation_func(g) * u
        else:
            h = mod.config.activation_func(h)
        out.append((h * probs[start:start + n].double().unsqueeze(-1)) @ w2[e].t())
        start += n
    return torch.cat(out)


# Per-dtype tolerances, relative to the output's max: fp32 reorders sums (~1e-6 of |y|); bf16 keeps
# 8 mantissa bits, and three roundings (two GEMM outputs, the activation) give ~1e-2 of |y|.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("glu", [True, False])
def test_grouped_experts_match_float64_reference(megatron_cpu, dtype, glu):
    torch.manual_seed(0)
    mod = _experts(megatron_cpu, glu, dtype)
    tpe = torch.tensor([5, 0, 9, 3])  # expert 1 gets no tokens
    x = torch.randn(int(tpe.sum()), H, dtype=dtype, requires_grad=True)
    probs = torch.rand(x.shape[0], dtype=torch.float32, requires_grad=True)
    dy = torch.randn(x.shape[0], H, dtype=torch.float64)
    y, _ = mod(x, tpe, probs)
    (y.double() * dy).sum().backward()

    xr = x.detach().double().requires_grad_(True)
    pr = probs.detach().double().requires_grad_(True)
    w1 = mod.linear_fc1.weight.detach().double().requires_grad_(True)
    w2 = mod.linear_fc2.weight.detach().double().requires_grad_(True)
    ref_mod = type("R", (), {"linear_fc1": type("W", (), {"weight": w1}),
                             "linear_fc2": type("W", (), {"weight": w2}), "config": mod.config})
    y_ref = _reference(ref_mod, xr, tpe, pr)
    (y_ref * dy).sum().backward()

    tol = TOL[dtype]
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(y, y_ref) < tol
    assert rel(x.grad, xr.grad) < tol and rel(probs.grad, pr.grad) < tol
    assert rel(mod.linear_fc1.weight.grad, w1.grad) < tol
    assert rel(mod.linear_fc2.weight.grad, w2.grad) < tol
    assert mod.linear_fc1.weight.grad[1].abs().max() == 0  # the idle expert


def test_fused_swiglu_path_equals_the_plain_activation(megatron_cpu):
    """--bias-swiglu-fusion routes the GLU through Megatron's weighted SwiGLU (its own autograd
    function); same values and gradients as the plain path (float32: summation-order level)."""
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    torch.manual_seed(3)
    mods = []
    for fused in (False, True):
        cfg = megatron_cpu.moe_config(hidden_size=H, ffn_hidden_size=F, num_moe_experts=E, gated_linear_unit=True,
                                      activation_func=torch.nn.functional.silu, bias_activation_fusion=fused)
        mods.append(TorchGroupedMLP(E, cfg))
    mods[1].load_state_dict(mods[0].state_dict())
    assert mods[1]._plain_swiglu() and mods[1].config.bias_activation_fusion
    tpe, x, probs = torch.tensor([3, 4, 0, 5]), torch.randn(12, H), torch.rand(12)
    grads = []
    for mod in mods:
        xi, pi = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        y, _ = mod(xi, tpe, pi)
        y.square().sum().backward()
        grads.append((y.detach(), xi.grad, pi.grad, mod.linear_fc1.weight.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_moe_layer_with_torch_experts_equals_sequential_mlp(megatron_cpu):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import get_submodules

    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cfg = megatron_cpu.moe_config(hidden_size=H, ffn_hidden_size=F, num_moe_experts=E, gated_linear_unit=True)
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=E, moe_grouped_gemm=False).mlp)
    stock = MoELayer(cfg, subs)
    ours = MoELayer(cfg, type(subs)(experts=TorchGroupedMLP, router=subs.router))
    with torch.no_grad():
        ours.router.weight.copy_(stock.router.weight)
        for i, ex in enumerate(stock.experts.local_experts):
            ours.experts.linear_fc1.weight[i].copy_(ex.linear_fc1.weight)
            ours.experts.linear_fc2.weight[i].copy_(ex.linear_fc2.weight)
    x = torch.randn(6, 3, H)
    outs = []
    for layer in (stock, ours):
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.sum().backward()
        outs.append((y.detach(), xi.grad))
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-5
    assert (outs[0][1] - outs[1][1]).abs().max() < 1e-5


def test_biases_are_refused(megatron_cpu):
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cfg = megatron_cpu.moe_config(hidden_size=H, ffn_hidden_size=F, num_moe_experts=E, add_bias_linear=True)
    with pytest.raises(ValueError, match="--disable-bias-linear"):
        TorchGroupedMLP(E, cfg)


def test_torch_dist_checkpoint_moves_between_sequential_and_torch_experts(megatron_cpu, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import get_submodules

    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cfg = megatron_cpu.moe_config(hidden_size=H, ffn_hidden_size=F, num_moe_experts=E, gated_linear_unit=True)
    subs = get_submodules(get_gpt_layer_local_submodules(num_experts=E, moe_grouped_gemm=False).mlp)
    make = {"sequential": lambda: MoELayer(cfg, subs),
            "torch": lambda: MoELayer(cfg, type(subs)(experts=TorchGroupedMLP, router=subs.router))}
    x = torch.randn(5, 2, H)
    for src, dst in (("sequential", "torch"), ("torch", "sequential")):
        torch.manual_seed(3 if src == "torch" else 4)
        a, b = make[src](), make[dst]()
        folder = tmp_path / f"{src}_to_{dst}"
        folder.mkdir()
        dist_checkpointing.save(a.sharded_state_dict(prefix="mlp."), str(folder))
        loaded = dist_checkpointing.load(b.sharded_state_dict(prefix="mlp."), str(folder))
        b.load_state_dict({k[len("mlp."):]: v for k, v in loaded.items()}, strict=True)
        with torch.no_grad():
            assert (a(x)[0] - b(x)[0]).abs().max() < 1e-5, (src, dst)


@pytest.mark.dist
def test_pretrain_resumes_a_sequential_checkpoint_on_torch_experts(tmp_path):
    """Megatron's pretrain() (EP=2, gloo): a run with SequentialMLP experts saves at iteration 5;
    the run resumed from it with --moe-expert-backend torch continues with the same losses
    (weights and optimizer moments move through the shared checkpoint keys)."""
    import shutil

    from conftest import pretrain_cpu, train_losses

    full_ckpt, full_log = tmp_path / "full", tmp_path / "full.jsonl"
    pretrain_cpu(tmp_path, full_ckpt, full_log)
    full = train_losses(full_log)
    resume_ckpt, resume_log = tmp_path / "resume", tmp_path / "resume.jsonl"
    resume_ckpt.mkdir()
    shutil.copytree(full_ckpt / "iter_0000005", resume_ckpt / "iter_0000005")
    (resume_ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    pretrain_cpu(tmp_path, resume_ckpt, resume_log, "--moe-expert-backend", "torch")
    resumed = train_losses(resume_log)
    assert sorted(resumed) == [6, 7, 8]
    for it in (6, 7, 8):  # float32 on CPU, GEMMs summed in another order: ~1e-6 relative
        assert resumed[it] == pytest.approx(full[it], rel=1e-5), (it, resumed, full)


@pytest.mark.parametrize("act", ["swiglu", "gelu", "tanh-gelu"])
def test_the_weighted_activation_kernels_are_chosen_where_they_compute_megatrons(megatron_cpu, monkeypatch, act):
    """Where Triton runs (here pretended), plain SwiGLU takes weighted_swiglu and torch's erf GELU
    without a GLU takes weighted_gelu; another GELU (tanh) keeps the plain activation. The
    stand-in kernels are the references, so the output still equals the float64 reference."""
    import functools

    from megatron_moe_ext.experts import grouped_mlp, weighted_activation

    calls = []

    def recording(name, ref):
        def run(fc1_out, probs):
            calls.append(name)
            return ref(fc1_out, probs)
        return run

    monkeypatch.setattr(grouped_mlp, "use_triton", lambda t: True)
    monkeypatch.setattr(grouped_mlp, "weighted_swiglu", recording("swiglu", weighted_activation.weighted_swiglu_reference))
    monkeypatch.setattr(grouped_mlp, "weighted_gelu", recording("gelu", weighted_activation.weighted_gelu_reference))
    torch.manual_seed(0)
    mod = _experts(megatron_cpu, glu=act == "swiglu")
    if act == "tanh-gelu":
        mod.config.activation_func = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    tpe = torch.tensor([5, 0, 9, 3])
    x, probs = torch.randn(int(tpe.sum()), H), torch.rand(int(tpe.sum()))
    y, _ = mod(x, tpe, probs)
    assert calls == ({"swiglu": ["swiglu"], "gelu": ["gelu"], "tanh-gelu": []}[act])
    ref = _reference(mod, x, tpe, probs)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < TOL[torch.float32]
