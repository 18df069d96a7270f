"""HuggingFace modeling for megatron-moe-ext's routing policies and layers (shipped into an exported
HF folder).

`export-hf` copies this file into HF_DIR and names it in config.json's `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)` computes what the Megatron
model computed. It imports only torch and transformers (>= 5: routers are modules of their own
there), never the plugin. The model is transformers' Qwen3-MoE or Mixtral with its router replaced:

* c2r: the top-1 expert free, the other k-1 the best among the top-1's partners
  (`moe_ext_c2r_partners[layer]`, expert slots as exported), the rule of the plugin's
  C2RRouter; probabilities as Qwen3-MoE's (softmax over all experts at the chosen ones,
  renormalised with `norm_topk_prob`, which is Megatron's softmax after the top-k).
* locmoe-plus: a token proposes its fewest top-affinity experts (cosine between token and gate
  vector) whose affinities reach `moe_ext_locmoe_plus_tau` x its positive affinity sum, at most
  k; probabilities are the softmax over its k best logits, zero where not proposed, as the
  plugin's LocMoEPlusRouter. At inference there is no expert-choice truncation: the capacity C is
  a property of a training batch, so every proposed expert is kept (dropless).

Weights keep the base model's names (`mlp.gate.weight`, the experts), so the on-disk layout and
its conversion on load are the base model's.

ScMoE / DGMoE (`MoeExtScMoEForCausalLM`) is transformers' Qwen2-MoE with the layer wiring of the
plugin's ScMoE layers: in MoE layer l+1 the routed experts read an earlier stream through their
own `shortcut_layernorm`: the dense layer l's post-attention stream (pos2, and dgmoe after a dense
layer) or the layer's own input (pos1; a first layer). pos1/pos2 add Qwen2-MoE's sigmoid-gated
shared expert on the current (post-attention, normed) stream; dgmoe adds a second top-k pass of
the same experts on the current stream that may not repeat an expert the routed pass chose.
The earlier stream is taken by forward pre-hooks on the producing norms (`_StreamTap`), so the
model's own forward, cache and masks stay transformers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralSparseMoeBlock
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeExperts,
    Qwen2MoeForCausalLM,
    Qwen2MoeMLP,
    Qwen2MoeRMSNorm,
    Qwen2MoeSparseMoeBlock,
    Qwen2MoeTopKRouter,
)
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock

POLICIES = ("c2r", "locmoe-plus")


class MoeExtQwen3MoeConfig(Qwen3MoeConfig):
    """Qwen3-MoE's config plus the routing policy and its settings."""

    model_type = "moe_ext_qwen3_moe"

    def __init__(self, moe_ext_policy: str = "c2r", moe_ext_c2r_partners=None,
                 moe_ext_locmoe_plus_tau: float = 0.8, **kwargs):
        _policy_fields(self, moe_ext_policy, moe_ext_c2r_partners, moe_ext_locmoe_plus_tau)
        super().__init__(**kwargs)


class _PolicyRouter(nn.Module):
    """What Qwen3-MoE's and Mixtral's routers hold (a gate weight [E, H] under the same name) and
    return ((logits [T, E], weights [T, k], indices [T, k])), with another selection."""

    def __init__(self, config, num_experts: int):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        # Mixtral always renormalises the top-k; Qwen3-MoE as configured
        self.norm_topk_prob = getattr(config, "norm_topk_prob", True)
        self.weight = nn.Parameter(torch.zeros(num_experts, self.hidden_dim))


class C2RTopKRouter(_PolicyRouter):
    """The router with the collaboration constraint on its selection."""

    def __init__(self, config, num_experts: int, partners):
        super().__init__(config, num_experts)
        # a plain list, made a tensor on first use: from_pretrained builds modules on the meta
        # device and would leave a non-persistent buffer uninitialised
        self._partner_lists = [list(map(int, row)) for row in partners]
        self._partners = None

    def partners(self, device) -> torch.Tensor:
        """LongTensor[E, top_t] of partner slots."""
        if self._partners is None or self._partners.device != device:
            self._partners = torch.tensor(self._partner_lists, dtype=torch.long, device=device)
        return self._partners

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)                       # [T, E]
        router_probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top1 = router_probs.argmax(dim=-1, keepdim=True)                           # [T, 1]
        indices = top1
        if self.top_k > 1:
            candidates = self.partners(top1.device)[top1.squeeze(-1)]              # [T, top_t]
            best = router_probs.gather(1, candidates).topk(self.top_k - 1, dim=-1).indices
            indices = torch.cat([top1, candidates.gather(1, best)], dim=-1)        # [T, k]
        values = router_probs.gather(1, indices)
        if self.norm_topk_prob:
            values = values / values.sum(dim=-1, keepdim=True)
        return router_logits, values.to(router_logits.dtype), indices


class LocMoEPlusRouter(_PolicyRouter):
    """The router with LocMoE+'s affinity token choice (dropless at inference)."""

    def __init__(self, config, num_experts: int, tau: float):
        super().__init__(config, num_experts)
        self.tau = tau

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)                       # [T, E]
        aff = F.normalize(hidden_states.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        top = aff.topk(self.top_k, dim=-1)
        indices = top.indices                                                      # [T, k]
        reach = top.values.clamp_min(0).cumsum(-1) >= self.tau * aff.clamp_min(0).sum(-1, keepdim=True) - 1e-12
        last = torch.full_like(reach[:, 0], self.top_k - 1, dtype=torch.long)
        lengths = torch.where(reach.any(-1), reach.float().argmax(-1), last) + 1
        within = torch.arange(self.top_k, device=aff.device)[None, :] < lengths[:, None]
        values = torch.softmax(router_logits.gather(1, indices).float(), dim=-1) * within
        return router_logits, values.to(router_logits.dtype), indices


def _install_policy_routers(model, config, num_experts: int, moe_block_cls) -> None:
    """Replace the router of every MoE block of `model.model.layers` by the policy's (small [E, H]
    modules; weights load under the same names)."""
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, moe_block_cls):
            continue
        if config.moe_ext_policy == "c2r":
            layer.mlp.gate = C2RTopKRouter(config, num_experts, config.moe_ext_c2r_partners[str(i)])
        else:
            layer.mlp.gate = LocMoEPlusRouter(config, num_experts, config.moe_ext_locmoe_plus_tau)


def _policy_fields(self, moe_ext_policy, moe_ext_c2r_partners, moe_ext_locmoe_plus_tau) -> None:
    if moe_ext_policy not in POLICIES:
        raise ValueError(f"moe_ext_policy {moe_ext_policy!r} is not one of {', '.join(POLICIES)}.")
    self.moe_ext_policy = moe_ext_policy
    # {str(layer index): [[partner slots] per expert slot]}, JSON-friendly
    self.moe_ext_c2r_partners = moe_ext_c2r_partners or {}
    self.moe_ext_locmoe_plus_tau = moe_ext_locmoe_plus_tau


class MoeExtQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = MoeExtQwen3MoeConfig

    def __init__(self, config: MoeExtQwen3MoeConfig):
        super().__init__(config)
        _install_policy_routers(self, config, config.num_experts, Qwen3MoeSparseMoeBlock)
        self.post_init()


class MoeExtMixtralConfig(MixtralConfig):
    """Mixtral's config plus the routing policy and its settings."""

    model_type = "moe_ext_mixtral"

    def __init__(self, moe_ext_policy: str = "c2r", moe_ext_c2r_partners=None,
                 moe_ext_locmoe_plus_tau: float = 0.8, **kwargs):
        _policy_fields(self, moe_ext_policy, moe_ext_c2r_partners, moe_ext_locmoe_plus_tau)
        super().__init__(**kwargs)


class MoeExtMixtralForCausalLM(MixtralForCausalLM):
    config_class = MoeExtMixtralConfig

    def __init__(self, config: MoeExtMixtralConfig):
        super().__init__(config)
        _install_policy_routers(self, config, config.num_local_experts, MixtralSparseMoeBlock)
        self.post_init()


SCMOE_MODES = ("pos1", "pos2", "dgmoe")


class MoeExtScMoEConfig(Qwen2MoeConfig):
    """Qwen2-MoE's config plus the ScMoE mode and, per MoE layer, where its routed input comes from."""

    model_type = "moe_ext_scmoe"

    def __init__(self, moe_ext_scmoe: str = "pos2", moe_ext_shortcut_sources=None, **kwargs):
        if moe_ext_scmoe not in SCMOE_MODES:
            raise ValueError(f"moe_ext_scmoe {moe_ext_scmoe!r} is not one of {', '.join(SCMOE_MODES)}.")
        self.moe_ext_scmoe = moe_ext_scmoe
        # {str(MoE layer index): index of the dense layer whose post-attention stream its routed
        # experts read, or None for the layer's own input}
        self.moe_ext_shortcut_sources = moe_ext_shortcut_sources or {}
        super().__init__(**kwargs)


class _StreamTap:
    """Streams handed from the layer that makes them to the MoE layer that reads them, within one
    forward (a plain object, not a module)."""

    def __init__(self):
        self.streams = {}

    def keeper(self, key: int):
        def hook(module, args):
            self.streams[key] = args[0]
        return hook

    def take(self, key: int) -> torch.Tensor:
        return self.streams.pop(key)


class ScMoEBlock(nn.Module):
    """The MoE block of an ScMoE/DGMoE layer: routed experts on the tapped stream, plus the gated
    shared expert (pos1/pos2) or a second excluding pass (dgmoe) on the current one."""

    def __init__(self, config: MoeExtScMoEConfig, tap: _StreamTap, key: int):
        super().__init__()
        self.mode, self.tap, self.key = config.moe_ext_scmoe, tap, key
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Qwen2MoeTopKRouter(config)
        self.experts = Qwen2MoeExperts(config)
        if self.mode != "dgmoe":
            self.shared_expert = Qwen2MoeMLP(config, intermediate_size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.shortcut_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        """current [b, s, h] (the post-attention stream after post_attention_layernorm)."""
        b, s, h = current.shape
        # 1. the routed pass on the earlier stream, through the shortcut's own norm
        routed_in = self.shortcut_layernorm(self.tap.take(self.key)).reshape(-1, h)
        _, weights, chosen = self.gate(routed_in)
        out = self.experts(routed_in, chosen, weights)
        xc = current.reshape(-1, h)
        if self.mode == "dgmoe":
            # 2. the current pass: the same gate and experts, never an expert the routed pass chose
            probs = torch.softmax(F.linear(xc, self.gate.weight), dtype=torch.float, dim=-1)
            taken = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
            idx = probs.masked_fill(taken, float("-inf")).topk(self.gate.top_k, dim=-1).indices
            w = probs.gather(1, idx)
            if self.norm_topk_prob:
                w = w / w.sum(dim=-1, keepdim=True)
            out = out + self.experts(xc, idx, w.to(xc.dtype))
        else:
            # 2. the shared expert on the current stream, scaled by its sigmoid gate
            out = out + torch.sigmoid(self.shared_expert_gate(xc)) * self.shared_expert(xc)
        return out.reshape(b, s, h)


class MoeExtScMoEForCausalLM(Qwen2MoeForCausalLM):
    config_class = MoeExtScMoEConfig

    def __init__(self, config: MoeExtScMoEConfig):
        super().__init__(config)
        self._tap = _StreamTap()
        layers = self.model.layers
        for key, source in sorted((int(k), v) for k, v in config.moe_ext_shortcut_sources.items()):
            if not isinstance(layers[key].mlp, Qwen2MoeSparseMoeBlock):
                raise ValueError(f"moe_ext_shortcut_sources names layer {key}, which is not an MoE layer.")
            layers[key].mlp = ScMoEBlock(config, self._tap, key)
            # the routed input: the dense layer's post-attention stream, or this layer's input
            producer = layers[source].post_attention_layernorm if source is not None else layers[key].input_layernorm
            producer.register_forward_pre_hook(self._tap.keeper(key))
        self.post_init()


def _load_like_qwen_moe() -> None:
    """Custom code gets no on-load weight conversion unless registered: reuse Qwen3-MoE's and
    Qwen2-MoE's (the per-expert layout on disk, fused in memory)."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without on-load conversions loads the layout as is
        return
    for base, names in (("qwen3_moe", ("MoeExtQwen3MoeForCausalLM", MoeExtQwen3MoeConfig.model_type)),
                        ("mixtral", ("MoeExtMixtralForCausalLM", MoeExtMixtralConfig.model_type)),
                        ("qwen2_moe", ("MoeExtScMoEForCausalLM", MoeExtScMoEConfig.model_type))):
        mapping = get_checkpoint_conversion_mapping(base)
        if mapping is None:
            continue
        for name in names:
            register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


_load_like_qwen_moe()
