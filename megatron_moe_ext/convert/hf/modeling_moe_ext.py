"""HuggingFace modeling for megatron-moe-ext's routing policies (shipped into an exported HF folder).

`export-hf` copies this file into HF_DIR and names it in config.json's `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)` computes what the Megatron
model computed. It imports only torch and transformers (>= 5: routers are modules of their own
there), never the plugin. The model is transformers' Qwen3-MoE with its router replaced:

* c2r: the top-1 expert free, the other k-1 the best among the top-1's partners
  (`moe_ext_c2r_partners[layer]`, expert slots as exported), the rule of the plugin's
  C2RRouter; probabilities as Qwen3-MoE's (softmax over all experts at the chosen ones,
  renormalised with `norm_topk_prob`, which is Megatron's softmax after the top-k).
* locmoe-plus: a token proposes its fewest top-affinity experts (cosine between token and gate
  vector) whose affinities reach `moe_ext_locmoe_plus_tau` x its positive affinity sum, at most
  k; probabilities are the softmax over its k best logits, zero where not proposed, as the
  plugin's LocMoEPlusRouter. At inference there is no expert-choice truncation: the capacity C is
  a property of a training batch, so every proposed expert is kept (dropless).

Weights keep Qwen3-MoE's names (`mlp.gate.weight`, the experts), so the on-disk layout and its
conversion on load are Qwen3-MoE's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
)

POLICIES = ("c2r", "locmoe-plus")


class MoeExtQwen3MoeConfig(Qwen3MoeConfig):
    """Qwen3-MoE's config plus the routing policy and its settings."""

    model_type = "moe_ext_qwen3_moe"

    def __init__(self, moe_ext_policy: str = "c2r", moe_ext_c2r_partners=None,
                 moe_ext_locmoe_plus_tau: float = 0.8, **kwargs):
        if moe_ext_policy not in POLICIES:
            raise ValueError(f"moe_ext_policy {moe_ext_policy!r} is not one of {', '.join(POLICIES)}.")
        self.moe_ext_policy = moe_ext_policy
        # {str(layer index): [[partner slots] per expert slot]}, JSON-friendly
        self.moe_ext_c2r_partners = moe_ext_c2r_partners or {}
        self.moe_ext_locmoe_plus_tau = moe_ext_locmoe_plus_tau
        super().__init__(**kwargs)


class C2RTopKRouter(Qwen3MoeTopKRouter):
    """Qwen3-MoE's router with the collaboration constraint on its selection."""

    def __init__(self, config, partners):
        super().__init__(config)
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
            candidates = self.partners(top1.device)[top1.squeeze(-1)]           # [T, top_t]
            best = router_probs.gather(1, candidates).topk(self.top_k - 1, dim=-1).indices
            indices = torch.cat([top1, candidates.gather(1, best)], dim=-1)        # [T, k]
        values = router_probs.gather(1, indices)
        if self.norm_topk_prob:
            values = values / values.sum(dim=-1, keepdim=True)
        return router_logits, values.to(router_logits.dtype), indices


class LocMoEPlusRouter(Qwen3MoeTopKRouter):
    """Qwen3-MoE's router with LocMoE+'s affinity token choice (dropless at inference)."""

    def __init__(self, config, tau: float):
        super().__init__(config)
        self.tau = tau

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)                       # [T, E]
        aff = F.normalize(hidden_states.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        top = aff.topk(self.top_k, dim=-1)
        indices = top.indices                                                      # [T, k]
        reach = top.values.clamp_min(0).cumsum(-1) >= self.tau * aff.clamp_min(0).sum(-1, keepdim=True) - 1e-12
        lengths = torch.where(reach.any(-1), reach.float().argmax(-1), torch.full_like(reach[:, 0], self.top_k - 1,
                                                                                         dtype=torch.long)) + 1
        within = torch.arange(self.top_k, device=aff.device)[None, :] < lengths[:, None]
        values = torch.softmax(router_logits.gather(1, indices).float(), dim=-1) * within
        return router_logits, values.to(router_logits.dtype), indices


class MoeExtQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = MoeExtQwen3MoeConfig

    def __init__(self, config: MoeExtQwen3MoeConfig):
        super().__init__(config)
        # only the routers change (small [E, H] modules); weights load under the same names
        for i, layer in enumerate(self.model.layers):
            if not isinstance(layer.mlp, Qwen3MoeSparseMoeBlock):
                continue
            if config.moe_ext_policy == "c2r":
                layer.mlp.gate = C2RTopKRouter(config, config.moe_ext_c2r_partners[str(i)])
            else:
                layer.mlp.gate = LocMoEPlusRouter(config, config.moe_ext_locmoe_plus_tau)
        self.post_init()


def _load_like_qwen3_moe() -> None:
    """Custom code gets no on-load weight conversion unless registered: reuse Qwen3-MoE's (the
    per-expert layout on disk, fused in memory)."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without on-load conversions loads the layout as is
        return
    mapping = get_checkpoint_conversion_mapping("qwen3_moe")
    if mapping is None:
        return
    for name in ("MoeExtQwen3MoeForCausalLM", MoeExtQwen3MoeConfig.model_type):
        try:
            register_checkpoint_conversion_mapping(name, mapping, overwrite=True)
        except TypeError:
            register_checkpoint_conversion_mapping(name, mapping)


_load_like_qwen3_moe()
