"""Megatron GPT-MoE tensors <-> HuggingFace tensors, one layer at a time.

Megatron names here are the torch_dist *global* keys without the layer axis (the checkpoint
stores `decoder.layers.<local>` as [layers, ...]); what the key means:
  self_attention.linear_qkv.layer_norm_weight  [H]  the input RMSNorm (fused into qkv's key)
  self_attention.linear_qkv.weight  [G*(Q/G+2)*D, H]  rows grouped per KV group g:
        [q heads of g (Q/G*D rows); k_g (D); v_g (D)], G = KV groups, Q = query heads, D = head dim
  self_attention.linear_qkv.bias    [G*(Q/G+2)*D]     the same grouping
  self_attention.{q,k}_layernorm.weight [D]          per-head RMSNorm (qk-layernorm)
  self_attention.linear_proj.weight [H, Q*D]
  mlp.linear_fc1.layer_norm_weight  [H]              the pre-MLP RMSNorm
  mlp.router.weight                 [E, H]
  mlp.experts.experts.linear_fc1.weight [E, 2F, H]   rows [gate; up] (SwiGLU)
  mlp.experts.experts.linear_fc2.weight [E, H, F]
  mlp.shared_experts.linear_fc1.weight  [2S, H]  [gate; up];  linear_fc2.weight [H, S]
  mlp.shared_experts.gate_weight        [1, H]   sigmoid gate of the shared expert
  mlp.linear_fc1.weight [2F', H], mlp.linear_fc2.weight [H, F']   dense (non-MoE) layers
Every backend (TEGroupedMLP, SequentialMLP, the plugin's torch experts) saves the experts as the
same stacked `experts.experts.linear_fc{1,2}.weight` global tensors (checked in the tests).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron_moe_ext.convert.hf.arch import Dims

Tensor = torch.Tensor

GLOBAL_TO_HF = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


# --- fused layouts --------------------------------------------------------------------------


def split_qkv(w: Tensor, d: Dims):
    """Megatron's grouped qkv [G*(Q/G+2)*D, ...] -> (q [Q*D, ...], k [G*D, ...], v [G*D, ...])."""
    qpg = d.heads // d.groups
    x = w.reshape(d.groups, qpg + 2, d.head_dim, *w.shape[1:])
    q = x[:, :qpg].reshape(d.heads * d.head_dim, *w.shape[1:])
    k = x[:, qpg].reshape(d.groups * d.head_dim, *w.shape[1:])
    v = x[:, qpg + 1].reshape(d.groups * d.head_dim, *w.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, d: Dims) -> Tensor:
    """Inverse of split_qkv: q [Q*D, ...], k/v [G*D, ...] -> [G*(Q/G+2)*D, ...]."""
    qpg = d.heads // d.groups
    rest = q.shape[1:]
    qg = q.reshape(d.groups, qpg, d.head_dim, *rest)
    kg = k.reshape(d.groups, 1, d.head_dim, *rest)
    vg = v.reshape(d.groups, 1, d.head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def split_gate_up(w: Tensor):
    """SwiGLU fc1 [2F, H] -> (gate [F, H], up [F, H])."""
    f = w.shape[0] // 2
    return w[:f].contiguous(), w[f:].contiguous()


# --- HF names --------------------------------------------------------------------------------


def _names(arch: str, layer: int):
    p = f"model.layers.{layer}"
    moe = f"{p}.block_sparse_moe" if arch == "mixtral" else f"{p}.mlp"
    gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return p, moe, gate, up, down


def layer_to_hf(arch: str, d: Dims, layer: int, get: Callable[[str], Optional[Tensor]]) -> Dict[str, Tensor]:
    """HF tensors of decoder layer `layer` from its Megatron tensors (`get(local_key)`, shapes
    as in the module docstring, None if absent)."""
    p, moe, g, u, dn = _names(arch, layer)
    out: Dict[str, Tensor] = {
        f"{p}.input_layernorm.weight": get("self_attention.linear_qkv.layer_norm_weight"),
        f"{p}.post_attention_layernorm.weight": get("mlp.linear_fc1.layer_norm_weight"),
        f"{p}.self_attn.o_proj.weight": get("self_attention.linear_proj.weight"),
    }
    q, k, v = split_qkv(get("self_attention.linear_qkv.weight"), d)
    out.update(
        {
            f"{p}.self_attn.q_proj.weight": q,
            f"{p}.self_attn.k_proj.weight": k,
            f"{p}.self_attn.v_proj.weight": v,
        }
    )
    if d.qkv_bias:
        qb, kb, vb = split_qkv(get("self_attention.linear_qkv.bias"), d)
        out.update(
            {
                f"{p}.self_attn.q_proj.bias": qb,
                f"{p}.self_attn.k_proj.bias": kb,
                f"{p}.self_attn.v_proj.bias": vb,
            }
        )
    if d.qk_norm:
        out[f"{p}.self_attn.q_norm.weight"] = get("self_attention.q_layernorm.weight")
        out[f"{p}.self_attn.k_norm.weight"] = get("self_attention.k_layernorm.weight")
    if not d.moe_layers[layer]:
        gw, uw = split_gate_up(get("mlp.linear_fc1.weight"))
        out.update(
            {
                f"{p}.mlp.gate_proj.weight": gw,
                f"{p}.mlp.up_proj.weight": uw,
                f"{p}.mlp.down_proj.weight": get("mlp.linear_fc2.weight"),
            }
        )
        return out
    out[f"{moe}.gate.weight"] = get("mlp.router.weight")
    shortcut_norm = get("shortcut_layernorm.weight")  # ScMoE layers: the routed input's own norm
    if shortcut_norm is not None:
        out[f"{moe}.shortcut_layernorm.weight"] = shortcut_norm
    fc1, fc2 = get("mlp.experts.experts.linear_fc1.weight"), get("mlp.experts.experts.linear_fc2.weight")
    for e in range(d.experts):
        gw, uw = split_gate_up(fc1[e])
        out[f"{moe}.experts.{e}.{g}.weight"] = gw
        out[f"{moe}.experts.{e}.{u}.weight"] = uw
        out[f"{moe}.experts.{e}.{dn}.weight"] = fc2[e].contiguous()
    if d.shared_ffn:
        gw, uw = split_gate_up(get("mlp.shared_experts.linear_fc1.weight"))
        out.update(
            {
                f"{p}.mlp.shared_expert.gate_proj.weight": gw,
                f"{p}.mlp.shared_expert.up_proj.weight": uw,
                f"{p}.mlp.shared_expert.down_proj.weight": get("mlp.shared_experts.linear_fc2.weight"),
                f"{p}.mlp.shared_expert_gate.weight": get("mlp.shared_experts.gate_weight"),
            }
        )
    return out


def layer_from_hf(arch: str, d: Dims, layer: int, hf: Callable[[str], Tensor]) -> Dict[str, Tensor]:
    """Megatron local tensors of layer `layer` (module docstring shapes) from HF tensors
    (`hf(name)`, per-expert names; fused HF layouts are split into these names on reading)."""
    p, moe, g, u, dn = _names(arch, layer)
    a = f"{p}.self_attn"
    out = {
        "self_attention.linear_qkv.layer_norm_weight": hf(f"{p}.input_layernorm.weight"),
        "mlp.linear_fc1.layer_norm_weight": hf(f"{p}.post_attention_layernorm.weight"),
        "self_attention.linear_proj.weight": hf(f"{a}.o_proj.weight"),
        "self_attention.linear_qkv.weight": merge_qkv(
            hf(f"{a}.q_proj.weight"), hf(f"{a}.k_proj.weight"), hf(f"{a}.v_proj.weight"), d
        ),
    }
    if d.qkv_bias:
        out["self_attention.linear_qkv.bias"] = merge_qkv(
            hf(f"{a}.q_proj.bias"), hf(f"{a}.k_proj.bias"), hf(f"{a}.v_proj.bias"), d
        )
    if d.qk_norm:
        out["self_attention.q_layernorm.weight"] = hf(f"{a}.q_norm.weight")
        out["self_attention.k_layernorm.weight"] = hf(f"{a}.k_norm.weight")
    if not d.moe_layers[layer]:
        out["mlp.linear_fc1.weight"] = torch.cat(
            [hf(f"{p}.mlp.gate_proj.weight"), hf(f"{p}.mlp.up_proj.weight")]
        )
        out["mlp.linear_fc2.weight"] = hf(f"{p}.mlp.down_proj.weight")
        return out
    out["mlp.router.weight"] = hf(f"{moe}.gate.weight")
    out["mlp.experts.experts.linear_fc1.weight"] = torch.stack(
        [
            torch.cat([hf(f"{moe}.experts.{e}.{g}.weight"), hf(f"{moe}.experts.{e}.{u}.weight")])
            for e in range(d.experts)
        ]
    )
    out["mlp.experts.experts.linear_fc2.weight"] = torch.stack(
        [hf(f"{moe}.experts.{e}.{dn}.weight") for e in range(d.experts)]
    )
    if d.shared_ffn:
        s = f"{p}.mlp.shared_expert"
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat(
            [hf(f"{s}.gate_proj.weight"), hf(f"{s}.up_proj.weight")]
        )
        out["mlp.shared_experts.linear_fc2.weight"] = hf(f"{s}.down_proj.weight")
        out["mlp.shared_experts.gate_weight"] = hf(f"{p}.mlp.shared_expert_gate.weight")
    return out


def expected_hf_shapes(arch: str, d: Dims) -> Dict[str, tuple]:
    """Every HF tensor name (per-expert layout) -> its shape, for checking an HF folder."""
    H, D = d.hidden, d.head_dim
    shapes = {"model.embed_tokens.weight": (d.vocab, H), "model.norm.weight": (H,)}
    if not d.tied:
        shapes["lm_head.weight"] = (d.vocab, H)
    for layer in range(d.num_layers):
        p, moe, g, u, dn = _names(arch, layer)
        a = f"{p}.self_attn"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (H,),
                f"{p}.post_attention_layernorm.weight": (H,),
                f"{a}.q_proj.weight": (d.heads * D, H),
                f"{a}.k_proj.weight": (d.groups * D, H),
                f"{a}.v_proj.weight": (d.groups * D, H),
                f"{a}.o_proj.weight": (H, d.heads * D),
            }
        )
        if d.qkv_bias:
            shapes.update(
                {
                    f"{a}.q_proj.bias": (d.heads * D,),
                    f"{a}.k_proj.bias": (d.groups * D,),
                    f"{a}.v_proj.bias": (d.groups * D,),
                }
            )
        if d.qk_norm:
            shapes.update({f"{a}.q_norm.weight": (D,), f"{a}.k_norm.weight": (D,)})
        if not d.moe_layers[layer]:
            shapes.update(
                {
                    f"{p}.mlp.gate_proj.weight": (d.ffn, H),
                    f"{p}.mlp.up_proj.weight": (d.ffn, H),
                    f"{p}.mlp.down_proj.weight": (H, d.ffn),
                }
            )
            continue
        shapes[f"{moe}.gate.weight"] = (d.experts, H)
        for e in range(d.experts):
            shapes.update(
                {
                    f"{moe}.experts.{e}.{g}.weight": (d.moe_ffn, H),
                    f"{moe}.experts.{e}.{u}.weight": (d.moe_ffn, H),
                    f"{moe}.experts.{e}.{dn}.weight": (H, d.moe_ffn),
                }
            )
        if d.shared_ffn:
            s = f"{p}.mlp.shared_expert"
            shapes.update(
                {
                    f"{s}.gate_proj.weight": (d.shared_ffn, H),
                    f"{s}.up_proj.weight": (d.shared_ffn, H),
                    f"{s}.down_proj.weight": (H, d.shared_ffn),
                    f"{p}.mlp.shared_expert_gate.weight": (1, H),
                }
            )
    return shapes
