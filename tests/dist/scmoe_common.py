"""ScMoE test helpers: a real Megatron TransformerBlock with the plugin's ScMoE spec, global weights
that do not depend on the EP size, and an independent implementation of the paper's equations.

The reference re-implements everything ScMoE changes (block composition, residuals, norms, routing
with the collision rule, experts, CG-1 shared expert) from the weights; it reuses only Megatron's
self-attention module, which ScMoE does not touch.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from common import moe_config

HIDDEN, FFN, EXPERTS = 16, 24, 4


def scmoe_config(mode: str, pattern: List[int], **overrides):
    kw = dict(num_layers=len(pattern), moe_layer_freq=pattern, hidden_size=HIDDEN, ffn_hidden_size=FFN,
              num_moe_experts=EXPERTS, moe_router_topk=1, moe_router_pre_softmax=True,
              hidden_dropout=0.0, attention_dropout=0.0)
    if mode != "dgmoe":
        kw.update(moe_shared_expert_intermediate_size=FFN, moe_shared_expert_gate=True)
    kw.update(overrides)
    return moe_config(**kw)


def scmoe_block(mode: str, cfg, expert_slot="auto", router_policy: str = "topk", layer_offset: int = 0,
                dedup: bool = False):
    """A TransformerBlock (local spec, SequentialMLP experts) with ScMoE layers; `dedup` uses the
    plugin's DedupMoELayer (one row per token and destination rank)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.mcore.scmoe_spec import apply_scmoe
    from megatron_moe_ext.mcore.specs import replace_moe_submodules, router_class_for

    ext = MoEExtConfig(router_policy=router_policy, scmoe=mode, scmoe_expert_slot=str(expert_slot))
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="LayerNorm")
    router = router_class_for(ext)
    layer_cls = None
    if dedup:
        from megatron_moe_ext.mcore.dispatch import DedupMoELayer

        layer_cls = DedupMoELayer
    if router is not None or layer_cls is not None:
        spec = replace_moe_submodules(spec, layer_cls=layer_cls, **({} if router is None else {"router": router}))
    spec = apply_scmoe(spec, ext, cfg, layer_offset=layer_offset)
    return TransformerBlock(cfg, spec)


def _global_name(name: str, block) -> str:
    """Parameter name with the local expert index replaced by the global one."""
    parts = name.split(".")
    if "local_experts" in parts:
        i = parts.index("local_experts")
        layer = block.layers[int(parts[1])]
        parts[i + 1] = str(layer.mlp.local_expert_indices[int(parts[i + 1])])
    return ".".join(parts)


def set_global_weights(block, seed: int) -> None:
    """Deterministic weights keyed by global parameter name (the same at any EP size)."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(_global_name(name, block).encode()))
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def global_grads(block) -> Dict[str, torch.Tensor]:
    return {_global_name(n, block): p.grad.detach().clone() for n, p in block.named_parameters()
            if p.grad is not None}


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]


# --- the paper's equations, written out -------------------------------------------------------

def _ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _mlp(fc1_w, fc2_w, x, act=F.gelu):
    return F.linear(act(F.linear(x, fc1_w)), fc2_w)


def _attention(layer, x, mask):
    return x + layer.self_attention(_ln(layer.input_layernorm, x), attention_mask=mask)[0]


def _route(router_w, x, topk, exclude: Optional[torch.Tensor] = None):
    """Pre-softmax top-k: weights are the full-softmax probabilities of the chosen experts."""
    probs = torch.softmax(F.linear(x, router_w).float(), dim=-1)
    scores = probs if exclude is None else probs.masked_fill(exclude, float("-inf"))
    idx = torch.topk(scores, topk, dim=-1).indices
    return idx, probs.gather(-1, idx)


def _experts(layer, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = layer.mlp.experts.local_experts[int(idx[t, j])]
            out[t] += w[t, j] * _mlp(e.linear_fc1.weight, e.linear_fc2.weight, x[t])
    return out


def reference_forward(block, x: torch.Tensor, mask: torch.Tensor, mode: str, stats: Optional[dict] = None):
    """x [s, b, h] -> output [s, b, h] of the ScMoE/DGMoE block, EP=1 weights."""
    s, b, h = x.shape
    prev_mh = None  # post-attention stream of the previous (dense) layer
    for layer in block.layers:
        inp = x
        mh = _attention(layer, x, mask)
        if not layer.is_moe_layer:
            x = mh + _mlp(layer.mlp.linear_fc1.weight, layer.mlp.linear_fc2.weight,
                          _ln(layer.pre_mlp_layernorm, mh))
            prev_mh = mh
            continue
        src = prev_mh if (mode != "pos1" and layer.shortcut_link is not None) else inp
        xr = _ln(layer.shortcut_layernorm, src).reshape(-1, h)
        xc = _ln(layer.pre_mlp_layernorm, mh).reshape(-1, h)
        topk = layer.config.moe_router_topk
        idx_r, w_r = _route(layer.mlp.router.weight, xr, topk)
        routed = _experts(layer, xr, idx_r, w_r)
        if mode == "dgmoe":
            taken = torch.zeros(xr.shape[0], layer.config.num_moe_experts, dtype=torch.bool)
            taken.scatter_(1, idx_r, True)
            idx_c, w_c = _route(layer.mlp.router.weight, xc, topk, exclude=taken)
            if stats is not None:
                plain, _ = _route(layer.mlp.router.weight, xc, topk)
                stats["collisions"] = stats.get("collisions", 0) + int(taken.gather(1, plain).any(1).sum())
                stats["tokens"] = stats.get("tokens", 0) + xc.shape[0]
            other = _experts(layer, xc, idx_c, w_c)
        else:
            se = layer.mlp.shared_experts
            gate = torch.sigmoid(F.linear(xc, se.gate_weight))
            other = gate * _mlp(se.linear_fc1.weight, se.linear_fc2.weight, xc)
        x = mh + (routed + other).reshape(s, b, h)
        prev_mh = None
    return block.final_layernorm(x) if getattr(block, "final_layernorm", None) is not None else x
