"""Which HuggingFace architecture a Megatron GPT-MoE is, and the config fields of each side.

Megatron -> HF (`choose_architecture`, `hf_config_kwargs`) reads Megatron's saved argparse
namespace; HF -> Megatron (`megatron_flags_from_hf`) reads config.json. Anything that one side
computes and the other cannot is refused with one sentence naming the setting and why.

Routing, what Megatron computes (megatron/core/transformer/moe/moe_utils.py,
topk_routing_with_score_function, score function softmax):
  * default (no --moe-router-pre-softmax): top-k of the logits, then softmax over those k
    = softmax over all experts renormalised over the top k: HF `norm_topk_prob=True`, and what
    Mixtral always does;
  * --moe-router-pre-softmax: softmax over all experts, then top-k, no renormalisation:
    HF `norm_topk_prob=False` (Qwen2/3-MoE; Mixtral cannot express it);
  * --moe-router-topk-scaling-factor s multiplies the probabilities by s: no HF field does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from megatron_moe_ext.errors import UserError

ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


class ArchitectureError(UserError):
    """The model uses a setting that the target architecture cannot express."""


@dataclass(frozen=True)
class Dims:
    """Shapes the tensor mapping needs (Megatron names in comments)."""

    num_layers: int
    hidden: int  # hidden_size
    heads: int  # num_attention_heads
    groups: int  # num_query_groups (KV heads)
    head_dim: int  # kv_channels
    experts: int  # num_experts
    moe_ffn: int  # moe_ffn_hidden_size
    ffn: int  # ffn_hidden_size (dense layers)
    shared_ffn: int  # moe_shared_expert_intermediate_size (0: none)
    vocab: int  # padded_vocab_size
    moe_layers: tuple  # 1 = MoE layer, 0 = dense, per layer
    tied: bool
    qkv_bias: bool
    qk_norm: bool


def _get(args, name, default=None):
    return getattr(args, name, default)


def moe_layer_pattern(args) -> List[int]:
    """Megatron's --moe-layer-freq as a list over layers (gpt_layer_specs: layer i is MoE when
    i % freq == 0, 0-based, or the explicit list)."""
    freq = _get(args, "moe_layer_freq", 1)
    n = args.num_layers
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(n)]
    return [int(x) for x in freq]


def dims_from_args(args) -> Dims:
    heads = args.num_attention_heads
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention") else heads
    groups = groups or heads
    return Dims(
        num_layers=args.num_layers,
        hidden=args.hidden_size,
        heads=heads,
        groups=groups,
        head_dim=_get(args, "kv_channels") or args.hidden_size // heads,
        experts=args.num_experts,
        moe_ffn=_get(args, "moe_ffn_hidden_size") or args.ffn_hidden_size,
        ffn=args.ffn_hidden_size,
        shared_ffn=_get(args, "moe_shared_expert_intermediate_size") or 0,
        vocab=_get(args, "padded_vocab_size") or args.vocab_size,
        moe_layers=tuple(moe_layer_pattern(args)),
        tied=not _get(args, "untie_embeddings_and_output_weights", False),
        qkv_bias=bool(_get(args, "add_qkv_bias")),
        qk_norm=bool(_get(args, "qk_layernorm")),
    )


def _refuse(setting: str, why: str) -> None:
    raise ArchitectureError(f"{setting}: {why}")


def choose_architecture(args, routing: str = "native") -> str:
    """'qwen3_moe' | 'qwen2_moe' | 'mixtral' for a Megatron run's args, or ArchitectureError.

    For the plugin's routing policies and ScMoE this is the base architecture that
    `plugin_arch.py` builds on (LocMoE maps to the stock one). routing='topk' exports a C2R or
    LocMoE+ model as plain top-k over the same router weights: the HF model then routes
    differently from training."""
    if not _get(args, "num_experts"):
        _refuse("--num-experts", "the model has no MoE layers; export-hf exports MoE models only.")
    from megatron_moe_ext.convert.hf.plugin_arch import base_check, plugin_variant

    variant = plugin_variant(args, routing)  # the plugin's own architectures (plugin_arch.py)
    checks = [
        (not _get(args, "swiglu"), "--swiglu off", "the HF MoE models use SwiGLU experts."),
        (
            _get(args, "normalization") != "RMSNorm",
            f"--normalization {_get(args, 'normalization')}",
            "the HF MoE models use RMSNorm.",
        ),
        (
            _get(args, "apply_layernorm_1p") or _get(args, "layernorm_zero_centered_gamma"),
            "--apply-layernorm-1p",
            "zero-centred norm weights have no HF field.",
        ),
        (
            _get(args, "position_embedding_type") != "rope",
            f"--position-embedding-type {_get(args, 'position_embedding_type')}",
            "the HF models use RoPE.",
        ),
        (
            _get(args, "rotary_percent", 1.0) != 1.0,
            "--rotary-percent",
            "partial RoPE has no field in these HF models.",
        ),
        (
            _get(args, "rotary_interleaved"),
            "--rotary-interleaved",
            "HF rotates halves, not interleaved pairs.",
        ),
        (
            _get(args, "use_rope_scaling") or _get(args, "rotary_seq_len_interpolation_factor"),
            "--use-rope-scaling",
            "RoPE scaling is not mapped yet.",
        ),
        (
            _get(args, "add_bias_linear"),
            "--add-bias-linear",
            "the HF MoE models have no linear biases besides Qwen2-MoE's q/k/v bias (--add-qkv-bias).",
        ),
        (
            _get(args, "multi_latent_attention"),
            "--multi-latent-attention",
            "MLA is DeepSeek's architecture, not mapped.",
        ),
        (
            _get(args, "mtp_num_layers"),
            "--mtp-num-layers",
            "multi-token-prediction layers have no place in these HF models.",
        ),
        (
            _get(args, "apply_residual_connection_post_layernorm"),
            "--apply-residual-connection-post-layernorm",
            "HF adds the residual before the norm.",
        ),
        (
            _get(args, "moe_router_score_function", "softmax") != "softmax",
            f"--moe-router-score-function {_get(args, 'moe_router_score_function')}",
            "the HF models route with softmax scores.",
        ),
        (
            _get(args, "moe_router_enable_expert_bias"),
            "--moe-router-enable-expert-bias",
            "the HF models have no expert bias in routing.",
        ),
        (
            _get(args, "moe_router_topk_scaling_factor") not in (None, 1.0),
            "--moe-router-topk-scaling-factor",
            "the HF models do not scale routing probabilities.",
        ),
        (
            _get(args, "moe_router_group_topk"),
            "--moe-router-group-topk",
            "group-limited routing has no HF field here.",
        ),
        (_get(args, "softmax_scale"), "--softmax-scale", "HF scales attention by 1/sqrt(head_dim)."),
        (_get(args, "qk_l2_norm"), "--qk-l2-norm", "no HF field."),
        (_get(args, "attention_output_gate"), "--attention-output-gate", "no HF field in these models."),
    ]
    for bad, setting, why in checks:
        if bad:
            _refuse(setting, why)
    d = dims_from_args(args)
    if variant == "scmoe":  # built on Qwen2-MoE (its gated shared expert; DGMoE has none)
        if d.qk_norm:
            _refuse("--qk-layernorm with --moe-scmoe", "the ScMoE export is built on Qwen2-MoE, which has "
                    "no q/k norm.")
        return "qwen2_moe"
    pre_softmax = bool(_get(args, "moe_router_pre_softmax"))
    if d.shared_ffn:
        if not _get(args, "moe_shared_expert_gate"):
            _refuse(
                "--moe-shared-expert-intermediate-size without --moe-shared-expert-gate",
                "Qwen2-MoE's shared expert is always gated (sigmoid), so an ungated one cannot map.",
            )
        if d.qk_norm:
            _refuse("--qk-layernorm with a shared expert", "Qwen2-MoE has no q/k norm.")
        arch = "qwen2_moe"
    elif d.qkv_bias:
        _refuse(
            "--add-qkv-bias without a shared expert",
            "only Qwen2-MoE has a q/k/v bias, and it needs a gated shared expert.",
        )
    elif d.qk_norm:
        arch = "qwen3_moe"
    else:
        if pre_softmax:
            _refuse(
                "--moe-router-pre-softmax without --qk-layernorm",
                "Mixtral always renormalises the top-k probabilities, and Qwen3-MoE (norm_topk_prob"
                "=False) would need q/k norms.",
            )
        arch = "mixtral"
    if arch == "mixtral" and not all(d.moe_layers):
        _refuse(
            "--moe-layer-freq",
            "Mixtral has MoE in every layer; dense layers map only to Qwen2/3-MoE "
            "(q/k norm or a gated shared expert).",
        )
    base_check(variant, arch)
    return arch


def hf_config_kwargs(args, arch: str) -> Dict[str, Any]:
    """Keyword arguments for the transformers config class of `arch`."""
    d = dims_from_args(args)
    eps = _get(args, "norm_epsilon") or _get(args, "layernorm_epsilon") or 1e-5
    kw: Dict[str, Any] = dict(
        vocab_size=d.vocab,
        hidden_size=d.hidden,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.groups,
        head_dim=d.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=eps,
        tie_word_embeddings=d.tied,
        rope_parameters={"rope_type": "default", "rope_theta": float(_get(args, "rotary_base", 10000))},
        num_experts_per_tok=args.moe_router_topk,
        router_aux_loss_coef=float(_get(args, "moe_aux_loss_coeff") or 0.0),
        attention_dropout=0.0,
        architectures=[ARCHITECTURES[arch]],
    )
    if arch == "mixtral":
        kw.update(num_local_experts=d.experts, intermediate_size=d.moe_ffn, sliding_window=None)
        return kw
    dense = [i for i, m in enumerate(d.moe_layers) if not m]
    kw.update(
        num_experts=d.experts,
        moe_intermediate_size=d.moe_ffn,
        intermediate_size=d.ffn,
        norm_topk_prob=not bool(_get(args, "moe_router_pre_softmax")),
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        use_sliding_window=False,
    )
    if arch == "qwen3_moe":
        kw.update(attention_bias=False)
    else:
        kw.update(shared_expert_intermediate_size=d.shared_ffn, qkv_bias=d.qkv_bias)
    return kw


# ---------------------------------------------------------------------------------------------
# HF -> Megatron


def _layer_pattern_from_hf(cfg: Dict[str, Any], n: int) -> List[int]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return [0 if (i in mlp_only or (i + 1) % step != 0) else 1 for i in range(n)]


def arch_from_hf_config(cfg: Dict[str, Any], path: str) -> str:
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES:
        raise ArchitectureError(
            f"{path}: model_type {mt!r} is not supported; import-hf reads {', '.join(ARCHITECTURES)}."
        )
    return mt


def dims_from_hf(cfg: Dict[str, Any], arch: str) -> Dims:
    n = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    experts = (
        cfg.get("num_local_experts")
        if arch == "mixtral"
        else cfg.get("num_experts", cfg.get("num_local_experts"))
    )
    moe_ffn = cfg["intermediate_size"] if arch == "mixtral" else cfg["moe_intermediate_size"]
    return Dims(
        num_layers=n,
        hidden=cfg["hidden_size"],
        heads=heads,
        groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        experts=experts,
        moe_ffn=moe_ffn,
        ffn=cfg["intermediate_size"],
        shared_ffn=cfg.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
        vocab=cfg["vocab_size"],
        moe_layers=tuple([1] * n if arch == "mixtral" else _layer_pattern_from_hf(cfg, n)),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("qkv_bias", False)) if arch == "qwen2_moe" else False,
        qk_norm=arch == "qwen3_moe",
    )


def megatron_flags_from_hf(
    cfg: Dict[str, Any], arch: str, path: str, *, tp: int = 1, pp: int = 1, ep: int = 1
) -> List[str]:
    """Megatron model flags (no data, schedule or CPU flags) computing what the HF config does."""

    def refuse(field, why):
        raise ArchitectureError(f"{path}: {field}: {why}")

    if cfg.get("hidden_act", "silu") != "silu":
        refuse(
            f"hidden_act {cfg.get('hidden_act')}", "only SwiGLU (silu) experts map to Megatron's --swiglu."
        )
    rope = cfg.get("rope_parameters") or {
        "rope_type": "default",
        "rope_theta": cfg.get("rope_theta", 10000.0),
    }
    if (rope.get("rope_type") or rope.get("type") or "default") != "default" or cfg.get("rope_scaling"):
        refuse("rope_parameters", f"RoPE type {rope.get('rope_type')} is not mapped (default RoPE only).")
    if cfg.get("use_sliding_window") or (arch == "mixtral" and cfg.get("sliding_window")):
        refuse("sliding_window", "sliding-window attention is not mapped.")
    if cfg.get("attention_bias"):
        refuse("attention_bias", "Megatron's --add-qkv-bias covers q/k/v only, not o_proj.")
    if arch == "qwen2_moe" and not cfg.get("shared_expert_intermediate_size"):
        refuse("shared_expert_intermediate_size", "Qwen2-MoE without a shared expert is not mapped.")
    theta = float(rope.get("rope_theta", 10000.0))
    if theta != int(theta):
        refuse(f"rope_theta {theta}", "Megatron's --rotary-base is an integer.")
    d = dims_from_hf(cfg, arch)
    for size, what, n in (
        (tp, "--tensor-model-parallel-size", d.groups),
        (tp, "--tensor-model-parallel-size", d.heads),
        (ep, "--expert-model-parallel-size", d.experts),
        (pp, "--pipeline-model-parallel-size", d.num_layers),
        (tp, "--tensor-model-parallel-size", d.vocab),
    ):
        if n % size:
            raise ArchitectureError(
                f"{what} {size} does not divide {n} (heads, KV heads, experts, layers "
                "or vocabulary of the model)."
            )
    flags = [
        "--num-layers",
        d.num_layers,
        "--hidden-size",
        d.hidden,
        "--num-attention-heads",
        d.heads,
        "--kv-channels",
        d.head_dim,
        "--ffn-hidden-size",
        d.ffn,
        "--max-position-embeddings",
        cfg.get("max_position_embeddings", 4096),
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        cfg.get("rms_norm_eps", 1e-6),
        "--swiglu",
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        int(theta),
        "--disable-bias-linear",
        "--vocab-size",
        d.vocab,
        "--make-vocab-size-divisible-by",
        1,
        "--num-experts",
        d.experts,
        "--moe-router-topk",
        cfg["num_experts_per_tok"],
        "--moe-ffn-hidden-size",
        d.moe_ffn,
        "--moe-router-load-balancing-type",
        "aux_loss",
        "--moe-aux-loss-coeff",
        cfg.get("router_aux_loss_coef", 0.0) or 0.0,
        "--moe-token-dispatcher-type",
        "alltoall",
        "--moe-router-dtype",
        "fp32",
        "--tensor-model-parallel-size",
        tp,
        "--pipeline-model-parallel-size",
        pp,
        "--expert-model-parallel-size",
        ep,
    ]
    if d.groups != d.heads:
        flags += ["--group-query-attention", "--num-query-groups", d.groups]
    if not d.tied:
        flags += ["--untie-embeddings-and-output-weights"]
    if d.qk_norm:
        flags += ["--qk-layernorm"]
    if d.qkv_bias:
        flags += ["--add-qkv-bias"]
    if arch != "mixtral" and not cfg.get("norm_topk_prob", False):
        flags += ["--moe-router-pre-softmax"]
    if not all(d.moe_layers):
        flags += ["--moe-layer-freq", "[" + ",".join(str(m) for m in d.moe_layers) + "]"]
    if d.shared_ffn:
        flags += ["--moe-shared-expert-intermediate-size", d.shared_ffn, "--moe-shared-expert-gate"]
    return [str(f) for f in flags]
