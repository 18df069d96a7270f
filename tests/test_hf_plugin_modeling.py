"""The HF modeling shipped for the plugin's policies (convert/hf/modeling_moe_ext.py) routes as the
plugin's Megatron routers do, and loads from a folder with trust_remote_code in the per-expert
layout on disk.

Router-level references are the plugin's own Megatron routers (C2RRouter, LocMoEPlusRouter) on
the real Megatron classes, with the same gate weights and inputs, in float32: chosen experts must
be identical and probabilities equal within 1e-6 (the same float32 softmax over the same logits,
summed in another order).
"""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_moe_ext.config import MoEExtConfig  # noqa: E402


def _modeling():
    from megatron_moe_ext.convert.hf import modeling_moe_ext

    return modeling_moe_ext


def _hf_config(policy: str, base: str = "qwen3_moe", **kw):
    m = _modeling()
    common = dict(moe_ext_policy=policy, vocab_size=128, hidden_size=16, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts_per_tok=kw.pop("k", 2),
                  max_position_embeddings=64, tie_word_embeddings=False, **kw)
    if base == "mixtral":
        return m.MoeExtMixtralConfig(intermediate_size=32, num_local_experts=8, **common)
    return m.MoeExtQwen3MoeConfig(intermediate_size=32, moe_intermediate_size=32, num_experts=8, **common)


def _megatron_router(common, policy_kw, **cfg_kw):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_ext.mcore.specs import router_class_for

    cfg = common.moe_config(num_moe_experts=8, **cfg_kw)
    r = router_class_for(MoEExtConfig(**policy_kw))(config=cfg, pg_collection=get_default_pg_collection())
    r.set_layer_number(1)
    r.eval()
    return r


def _dense(values, indices, num_experts):
    return torch.zeros(values.shape[0], num_experts).scatter_(1, indices, values.float())


@pytest.mark.parametrize("k, pre_softmax", [(2, False), (3, False), (2, True)])
def test_c2r_router_matches_the_megatron_router(megatron_cpu, k, pre_softmax):
    torch.manual_seed(0)
    r = _megatron_router(megatron_cpu, dict(router_policy="c2r", c2r_top_t=2), moe_router_topk=k,
                         moe_router_pre_softmax=pre_softmax)
    with torch.no_grad():
        r.weight.normal_()
    x = torch.randn(64, 1, 16)
    with torch.no_grad():
        probs, rmap = r(x)
    m = _modeling()
    # softmax after the top-k (Megatron's default) is Qwen3-MoE's renormalised top-k
    hf = m.C2RTopKRouter(_hf_config("c2r", k=k, norm_topk_prob=not pre_softmax), 8, r.c2r_partners.tolist())
    with torch.no_grad():
        hf.weight.copy_(r.weight)
        _, values, indices = hf(x.view(-1, 16))
    dense = _dense(values, indices, 8)
    assert torch.equal(dense != 0, rmap)
    torch.testing.assert_close(dense, probs.float(), rtol=0, atol=1e-6)


def test_locmoe_plus_router_matches_the_megatron_router_without_drops(megatron_cpu):
    torch.manual_seed(1)
    # a capacity factor that drops nothing: inference is dropless
    r = _megatron_router(megatron_cpu, dict(router_policy="locmoe-plus", locmoe_plus_tau=0.5),
                         moe_router_topk=3, moe_expert_capacity_factor=100.0)
    with torch.no_grad():
        r.weight.add_(0.3 * torch.randn_like(r.weight))  # away from GrAP's ties
    x = torch.randn(64, 1, 16)
    with torch.no_grad():
        probs, rmap = r(x)
    hf = _modeling().LocMoEPlusRouter(_hf_config("locmoe-plus", k=3), 8, tau=0.5)
    with torch.no_grad():
        hf.weight.copy_(r.weight)
        _, values, indices = hf(x.view(-1, 16))
    dense = _dense(values, indices, 8)
    assert torch.equal(dense != 0, rmap)
    assert (rmap.sum(1) < 3).any()  # the threshold did shorten some tokens' lists
    torch.testing.assert_close(dense, probs.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy, base", [("c2r", "qwen3_moe"), ("locmoe-plus", "qwen3_moe"), ("c2r", "mixtral")])
def test_folder_loads_with_trust_remote_code_in_the_per_expert_layout(tmp_path, policy, base):
    from safetensors import safe_open

    m = _modeling()
    partners = {str(i): [[(e + 1) % 8, (e + 2) % 8] for e in range(8)] for i in range(2)}
    cfg = _hf_config(policy, base, moe_ext_c2r_partners=partners if policy == "c2r" else None)
    torch.manual_seed(2)
    name = "MoeExtMixtral" if base == "mixtral" else "MoeExtQwen3Moe"
    model = getattr(m, f"{name}ForCausalLM")(cfg).eval()
    model.config.auto_map = {"AutoConfig": f"modeling_moe_ext.{name}Config",
                             "AutoModelForCausalLM": f"modeling_moe_ext.{name}ForCausalLM"}
    out = tmp_path / "hf"
    model.save_pretrained(out)
    shutil.copy(m.__file__, out / "modeling_moe_ext.py")
    keys = []
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys += list(sf.keys())
    per_expert = ".block_sparse_moe.experts.0.w1.weight" if base == "mixtral" else ".mlp.experts.0.gate_proj.weight"
    assert any(per_expert in k for k in keys), keys[:10]
    assert json.loads((out / "config.json").read_text())["moe_ext_policy"] == policy

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == f"{name}ForCausalLM"
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
        generated = loaded.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def _scmoe_config(mode: str):
    m = _modeling()
    # layers 0 and 2 dense, 1 and 3 MoE (pos2/dgmoe read the dense layer before); pos1 every layer MoE
    if mode == "pos1":
        dense, sources = [], {str(i): None for i in range(4)}
    else:
        dense, sources = [0, 2], {"1": 0, "3": 2}
    return m.MoeExtScMoEConfig(
        moe_ext_scmoe=mode, moe_ext_shortcut_sources=sources, mlp_only_layers=dense, vocab_size=128,
        hidden_size=16, intermediate_size=32, moe_intermediate_size=24,
        shared_expert_intermediate_size=0 if mode == "dgmoe" else 24, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, qkv_bias=False, max_position_embeddings=64, tie_word_embeddings=False)


def _expert(experts, e, x):
    gate, up = (x @ experts.gate_up_proj[e].double().t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].double().t()


def _route_ref(weight, x, k, exclude=None):
    probs = torch.softmax(x @ weight.double().t(), dim=-1)
    scores = probs if exclude is None else probs.masked_fill(exclude, float("-inf"))
    idx = scores.topk(k, dim=-1).indices
    w = probs.gather(1, idx)
    return idx, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("mode", ["pos1", "pos2", "dgmoe"])
def test_scmoe_layers_follow_the_equations(mode):
    """Each ScMoE block's output, from the streams it should read, against a float64 per-token
    reference of the paper's equations (tolerance 1e-5: the model runs in float32)."""
    m = _modeling()
    torch.manual_seed(3)
    model = m.MoeExtScMoEForCausalLM(_scmoe_config(mode)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    layers = model.model.layers
    seen = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda mod, a, kw, i=i: seen.__setitem__(("in", i), (a or (kw["hidden_states"],))[0]),
                                        with_kwargs=True)
        layer.post_attention_layernorm.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(("mh", i), a[0]))
        layer.mlp.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(("mlp", i), (a[0], out)))
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 7)))
    sources = model.config.moe_ext_shortcut_sources
    checked = 0
    for key, source in sources.items():
        g = int(key)
        block = layers[g].mlp
        assert isinstance(block, m.ScMoEBlock)
        src = seen[("mh", source)] if source is not None else seen[("in", g)]
        current, out = seen[("mlp", g)]
        h = src.shape[-1]
        xr = block.shortcut_layernorm(src).reshape(-1, h).double()
        xc = current.reshape(-1, h).double()
        idx, w = _route_ref(block.gate.weight, xr, 2)
        ref = torch.stack([sum(w[t, j] * _expert(block.experts, int(idx[t, j]), xr[t]) for j in range(2))
                           for t in range(xr.shape[0])])
        if mode == "dgmoe":
            taken = torch.zeros(xr.shape[0], 6, dtype=torch.bool).scatter_(1, idx, True)
            idx_c, w_c = _route_ref(block.gate.weight, xc, 2, exclude=taken)
            assert not (idx_c.unsqueeze(2) == idx.unsqueeze(1)).any()  # never an expert twice
            ref = ref + torch.stack([sum(w_c[t, j] * _expert(block.experts, int(idx_c[t, j]), xc[t])
                                         for j in range(2)) for t in range(xc.shape[0])])
        else:
            se = block.shared_expert
            shared = (torch.nn.functional.silu(xc @ se.gate_proj.weight.double().t()) * (xc @ se.up_proj.weight.double().t())
                      ) @ se.down_proj.weight.double().t()
            ref = ref + torch.sigmoid(xc @ block.shared_expert_gate.weight.double().t()) * shared
        torch.testing.assert_close(out.reshape(-1, h).double(), ref, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == len(sources) > 0


def test_scmoe_folder_loads_with_trust_remote_code(tmp_path):
    m = _modeling()
    torch.manual_seed(4)
    model = m.MoeExtScMoEForCausalLM(_scmoe_config("pos2")).eval()
    model.config.auto_map = {"AutoConfig": "modeling_moe_ext.MoeExtScMoEConfig",
                             "AutoModelForCausalLM": "modeling_moe_ext.MoeExtScMoEForCausalLM"}
    out = tmp_path / "hf"
    model.save_pretrained(out)
    shutil.copy(m.__file__, out / "modeling_moe_ext.py")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    tokens = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        # identical weights; the loaded model may pick another attention kernel: float32 rounding
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-6)
        assert loaded.generate(tokens[:, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)
