"""LocMoE math (pure torch): node-local experts, the locality loss, the GrAP gate, and the
expert-capacity lower bound (Li et al., IJCAI 2024; the methods doc section 2).

Locality loss, the form chosen here (the paper writes mu * KL(D_c || D_l) without defining the
two distributions precisely):
  D_c[e] = mean over this rank's tokens of the router probability p_e(x): the batch's routing
           distribution, differentiable;
  D_l    = the fully localized distribution: (1 - eps) spread uniformly over the experts on this
           rank's node, eps spread uniformly over the others (eps-smoothing keeps KL finite);
  L_loc  = mu * KL(D_c || D_l) = mu * sum_e D_c[e] (log D_c[e] - log D_l[e]).
Its gradient lowers the mass on remote experts; with eps -> 0 it behaves like
-mu * log P(local) plus the entropy of D_c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def localized_distribution(local_mask: torch.Tensor, eps: float) -> torch.Tensor:
    """D_l (float64, local_mask's shape: [E] for one source rank, [V, E] for V of them): 1-eps
    uniform on a row's local experts, eps uniform on the rest."""
    n_local = local_mask.sum(-1, keepdim=True).double()
    n_remote = local_mask.shape[-1] - n_local
    if bool((n_local == 0).any()):
        raise ValueError("no expert lives on this node; the locality loss needs local experts.")
    local = torch.where(n_remote > 0, (1 - eps) / n_local, 1.0 / n_local)
    return torch.where(local_mask, local, eps / n_remote.clamp_min(1))


def locality_loss(probs: torch.Tensor, local_mask: torch.Tensor, *, eps: float = 1e-3,
                  valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(D_c || D_l) for one source rank (multiply by mu outside).

    Args:
        probs: [T, E] router probabilities over all experts (softmax/normalized scores).
        local_mask: BoolTensor[E], experts on this rank's node.
        eps: mass D_l gives to remote experts (> 0 keeps the loss finite).
        valid: optional BoolTensor[T], tokens that count (padding excluded).
    Returns: scalar tensor in probs' dtype promoted to float32 or higher.
    """
    p = probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs
    log_d_l = torch.log(localized_distribution(local_mask.cpu(), eps)).to(device=p.device, dtype=p.dtype)
    return locality_kl(p / p.sum(-1, keepdim=True), log_d_l, valid=valid)


def locality_kl(probs: torch.Tensor, log_d_l: torch.Tensor,
                valid: Optional[torch.Tensor] = None,
                pool: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                sources: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`locality_loss` with log D_l [E] computed once by the caller, in probs' float dtype and on
    its device (the router's hot path: no host synchronization, no boolean indexing, few ops).
    Rows of probs sum to 1 (softmax or normalized scores), so their mean D_c does too.

    `pool` sums [score sums (E), token count] over the ranks that share this micro-batch's tokens
    (sequence-parallel TP shards: forward all-reduce, backward identity), so D_c is the whole
    micro-batch's, as at TP 1, and the sum over those ranks of each rank's gradient is TP 1's.

    `sources` (LongTensor[T] in [0, V), with log_d_l [V, E]): the tokens come from V source ranks
    (an emulated layout, `--moe-locmoe-layout-ep`); the loss is the mean over them of each one's
    KL(D_c || D_l), what V data-parallel ranks' losses average to."""
    p = probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs
    if sources is None:
        if valid is None:
            sums, count = p.sum(0), p.new_full((1,), p.shape[0])
        else:
            w = valid.to(p.dtype).unsqueeze(-1)
            sums, count = (p * w).sum(0), w.sum().reshape(1)
    else:
        V, E = log_d_l.shape
        w = p.new_ones(p.shape[0]) if valid is None else valid.to(p.dtype)
        sums = p.new_zeros(V, E).index_add(0, sources, p * w.unsqueeze(-1)).reshape(-1)
        count = p.new_zeros(V).index_add(0, sources, w)
    return locality_kl_from_sums(sums, count, log_d_l, pool=pool)


D_C_FLOOR = 1e-12   # D_c is clamped here inside the log: an expert no token scored adds 0, not NaN


def locality_kl_from_sums(sums: torch.Tensor, count: torch.Tensor, log_d_l: torch.Tensor,
                          pool: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """`locality_kl` from the scores' column sums: sums [E] (or [V * E], one block per source) and
    count [1] (or [V]) tokens; D_c = sums / count. What a fused router that already sums its
    scores (kernels/fused_router.py) passes, so the [T, E] scores are never read again."""
    if pool is not None:
        n = count.numel()
        pooled = pool(torch.cat([sums, count]))
        sums, count = pooled[:-n], pooled[-n:].detach()
    if log_d_l.dim() == 1:
        d_c = sums / count.clamp_min(1.0)
        return (d_c * (torch.log(d_c.clamp_min(D_C_FLOOR)) - log_d_l)).sum()
    d_c = sums.reshape(log_d_l.shape) / count.clamp_min(1.0).unsqueeze(-1)
    return (d_c * (torch.log(d_c.clamp_min(D_C_FLOOR)) - log_d_l)).sum() / log_d_l.shape[0]


def grap_gate_weight(num_experts: int, hidden_size: int, dtype=torch.float32) -> torch.Tensor:
    """GrAP gate (Eq. 4): W[E, H] with W[i, j] = E/H on the i-th contiguous H/E slice, else 0, so
    logit i is the mean of slice i. Rows are mutually orthogonal with equal norms."""
    if hidden_size % num_experts:
        raise ValueError(f"the GrAP gate needs hidden size {hidden_size} divisible by the "
                         f"{num_experts} experts (each expert averages one equal slice).")
    w = torch.zeros(num_experts, hidden_size, dtype=dtype)
    s = hidden_size // num_experts
    for i in range(num_experts):
        w[i, i * s:(i + 1) * s] = num_experts / hidden_size
    return w


def chosen_expert_cosine(hidden: torch.Tensor, gate_weight: torch.Tensor,
                         routing_map: torch.Tensor) -> torch.Tensor:
    """cos(x_t, w_e) for every chosen (t, e): [T, H], [E, H], Bool[T, E] -> [pairs] float32."""
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    w = torch.nn.functional.normalize(gate_weight.float(), dim=-1)
    return (x @ w.t())[routing_map]


@dataclass
class CapacityBound:
    """Theorem 1's lower bound on expert capacity (tokens), in both forms."""

    delta: float
    hidden_size: int
    num_experts: int
    beta_form: float   # 1 / (n (1 - I_{delta^2}(1/2, (d-1)/2)))
    erfc_form: float   # 1 / (n erfc(sqrt(delta^2 d / (2 - delta^2))))


def capacity_lower_bound(delta: float, hidden_size: int, num_experts: int) -> CapacityBound:
    """ec_min for angle statistic `delta` in (0, 1), model width d and n experts (float64/mpmath).

    The incomplete-beta form is exact under the paper's assumptions; the erfc form is its large-d
    approximation. Both grow like exp(delta^2 d / (2 - delta^2)): guard before using them."""
    import mpmath

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    d, n = hidden_size, num_experts
    tail = 1 - mpmath.betainc(0.5, (d - 1) / 2, 0, delta ** 2, regularized=True)
    beta_form = float(1 / (n * tail)) if tail > 0 else math.inf
    z = math.sqrt(delta ** 2 * d / (2 - delta ** 2))
    erfc = float(mpmath.erfc(z))
    erfc_form = 1 / (n * erfc) if erfc > 0 else math.inf
    return CapacityBound(delta, d, n, beta_form, erfc_form)


def capacity_factor_from_bound(bound_tokens: float, *, num_tokens: int, topk: int, num_experts: int,
                               max_capacity_factor: float) -> tuple[float, bool]:
    """Megatron capacity factor that gives at least `bound_tokens` per expert, clamped to
    `max_capacity_factor`. Returns (factor, clamped). Megatron's capacity is
    ceil(T k / E * factor)."""
    per_expert = num_tokens * topk / num_experts
    factor = bound_tokens / per_expert if per_expert > 0 else max_capacity_factor
    if not math.isfinite(factor) or factor > max_capacity_factor:
        return max_capacity_factor, True
    return factor, False


# --- LocMoE+ (expert-token resonance): affinity, token-choice top-l, expert-choice truncation ----

def affinity(hidden: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """delta[t, i] = cos(x_t, w_i): [T, H], [E, H] -> [T, E] float32."""
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    w = torch.nn.functional.normalize(gate_weight.float(), dim=-1)
    return x @ w.t()


def token_choice_lengths(aff: torch.Tensor, max_l: int, tau: float) -> torch.Tensor:
    """Per token, l_t = the fewest top experts whose affinities add up to tau times the sum of its
    positive affinities, at least 1 and at most `max_l` (the model's k). [T, E] -> LongTensor[T].

    This is our reading of "l is determined by a threshold of the sum of affinity scores"."""
    top = aff.topk(max_l, dim=1).values.clamp_min(0)                       # [T, l]
    total = aff.clamp_min(0).sum(1, keepdim=True)                           # [T, 1]
    reached = top.cumsum(1) >= tau * total - 1e-12                          # [T, l]
    first = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(total[:, 0], max_l - 1).long())
    return (first + 1).clamp(1, max_l)


def token_choice_map(aff: torch.Tensor, max_l: int, tau: float):
    """Token-choice stage: (order LongTensor[T, max_l] of experts by affinity, proposed
    Bool[T, E] with each token's first l_t of them, l_t from `token_choice_lengths`)."""
    order = aff.topk(max_l, dim=1).indices
    lengths = token_choice_lengths(aff, max_l, tau)
    within = torch.arange(max_l, device=aff.device).unsqueeze(0) < lengths.unsqueeze(1)
    proposed = torch.zeros_like(aff, dtype=torch.bool).scatter_(1, order, within)
    return order, proposed


def expert_choice_keep(aff: torch.Tensor, proposed: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert keeps the `capacity` proposing tokens of highest affinity.

    aff [T, E], proposed Bool[T, E] (token-choice stage) -> Bool[T, E] kept assignments."""
    masked = torch.where(proposed, aff, torch.full_like(aff, float("-inf")))
    c = min(capacity, aff.shape[0])
    top_tokens = masked.topk(c, dim=0).indices                             # [C, E]
    keep = torch.zeros_like(proposed)
    keep.scatter_(0, top_tokens, True)
    return keep & proposed


def resonance_capacity(aff_max: torch.Tensor, hidden_size: int, num_experts: int, *,
                       quantile: float = 0.9, floor: int = 1) -> int:
    """LocMoE+ re-estimated capacity (Remark 7): C = (1/n) exp(d delta^2 / (2 - delta^2)) with
    delta a high quantile of the tokens' best affinity, at least `floor`. Clamp it outside."""
    delta = float(torch.quantile(aff_max.float().clamp(0, 0.999), quantile))
    exponent = hidden_size * delta ** 2 / (2 - delta ** 2)
    if exponent > 700:  # exp overflows float64: unbounded, the caller's clamp decides
        return 1 << 62
    return max(floor, math.ceil(math.exp(exponent) / num_experts))
