"""`megatron-moe-ext comm-volume`: all-to-all rows a routing policy sends, offline and deterministic.

Logits are synthetic (seeded) or come from a routing trace recorded in training
(`--save-routing-trace`). The policy picks experts; `metrics.py` counts what the dispatcher sends
(one row per token-expert pair for Megatron's alltoall, one per token-rank pair with `--dedup`),
of which remote and inter-node, beside what stock top-k with the stock dispatcher sends for the
same logits.

Synthetic logits: standard normal per (token, expert) plus a per-expert popularity offset with
standard deviation `--skew` (0 = uniform experts). The T tokens start on the EP ranks in equal
contiguous blocks (block r on rank r).
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch

from megatron_moe_ext.errors import UserError
from megatron_moe_ext.files.trace import load_trace
from megatron_moe_ext.routing.policies import (
    ROUTING_POLICIES,
    PolicyContext,
    indices_to_map,
    topk_policy,
)
from megatron_moe_ext.routing.volume import dispatch_counts, volume_from_counts


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "comm-volume", help="All-to-all rows per token that a routing policy sends (offline).",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="topk", choices=sorted(ROUTING_POLICIES))
    p.add_argument("--experts", type=int, help="number of experts (default: the trace's, else 64)")
    p.add_argument("--topk", type=int, help="experts per token (default: the trace's, else 4)")
    p.add_argument("--ep", type=int, help="expert-parallel size (default: the trace's, else 8)")
    p.add_argument("--ranks-per-node", type=int,
                   help="EP ranks per node (default: the trace's, else --ep, i.e. one node)")
    p.add_argument("--tokens", type=int, default=65536, help="synthetic tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skew", type=float, default=0.0, help="std of per-expert logit offsets")
    p.add_argument("--trace", help="routing trace file or folder instead of synthetic logits")
    p.add_argument("--dedup", action="store_true",
                   help="count a rank-deduplicating dispatcher (one row per token and rank)")
    p.add_argument("--hidden", type=int, help="hidden size, to report bytes")
    p.add_argument("--bytes-per-element", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for policy in ROUTING_POLICIES.values():
        if policy.add_args:
            policy.add_args(p)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    try:
        layers, meta = _load_inputs(ns)
    except ValueError as e:
        raise UserError(str(e)) from None
    E, k, ep, rpn = meta["experts"], meta["topk"], meta["ep"], meta["ranks_per_node"]
    policy = ROUTING_POLICIES[ns.policy]
    per_layer: Dict[str, Dict] = {}
    total = total_stock = None
    for layer, (logits, src) in layers.items():
        ctx = PolicyContext(E, ep, rpn, src, options=vars(ns), layer=layer)
        try:
            chosen = policy.select(logits, k, ctx)
        except ValueError as e:  # PlanError included
            raise UserError(str(e)) from None
        stock = topk_policy(logits, k, ctx)
        counts = dispatch_counts(indices_to_map(chosen, E), ep_size=ep, ep_ranks_per_node=rpn,
                                 src_ep_rank=src)
        stock_counts = dispatch_counts(indices_to_map(stock, E), ep_size=ep,
                                       ep_ranks_per_node=rpn, src_ep_rank=src)
        total = counts if total is None else total + counts
        total_stock = stock_counts if total_stock is None else total_stock + stock_counts
        if meta["from_trace"]:
            per_layer[str(layer)] = _figures(counts, stock_counts, ns)
    out = {"policy": ns.policy, "dedup": ns.dedup, "experts": E, "topk": k, "ep": ep,
           "ranks_per_node": rpn, "tokens": int(total[0].item()),
           "source": meta["source"], **_figures(total, total_stock, ns)}
    if per_layer:
        out["layers"] = per_layer
    if ns.json:
        print(json.dumps(out))
    else:
        _print_table(out)
    return 0


def _figures(counts: torch.Tensor, stock_counts: torch.Tensor, ns) -> Dict:
    v = volume_from_counts(counts, dedup=ns.dedup, hidden_size=ns.hidden,
                           bytes_per_element=ns.bytes_per_element)
    s = volume_from_counts(stock_counts, dedup=False)
    fig = {key: getattr(v, key) for key in (
        "rows_per_token", "remote_rows_per_token", "inter_node_rows_per_token",
        "distinct_ranks_per_token", "load_cv")}
    fig.update(stock_rows_per_token=s.rows_per_token,
               stock_remote_rows_per_token=s.remote_rows_per_token,
               stock_inter_node_rows_per_token=s.inter_node_rows_per_token,
               stock_load_cv=s.load_cv)
    if ns.hidden:
        fig.update(bytes_per_token=v.bytes_per_token, remote_bytes_per_token=v.remote_bytes_per_token,
                   inter_node_bytes_per_token=v.inter_node_bytes_per_token)
    return fig


def _load_inputs(ns):
    """-> ({layer: (logits [T, E], src_ep_rank [T])}, meta) after validating the flags."""
    if ns.trace:
        tr = load_trace(ns.trace)
        for flag, given, have in (("--experts", ns.experts, tr.num_experts), ("--ep", ns.ep, tr.ep_size)):
            if given is not None and given != have:
                raise ValueError(f"{flag} {given} does not match the trace's {have} ({tr.files[0]}).")
        E, ep = tr.num_experts, tr.ep_size
        k = ns.topk or tr.topk
        rpn = ns.ranks_per_node or tr.ep_ranks_per_node
        layers = {layer: (tr.logits[layer], tr.src_ep_rank[layer]) for layer in tr.logits}
        source = f"trace:{ns.trace}"
    else:
        E, k, ep = ns.experts or 64, ns.topk or 4, ns.ep or 8
        rpn = ns.ranks_per_node or ep
        source = f"synthetic(seed={ns.seed}, skew={ns.skew})"
    if ep < 1 or E % ep:
        raise ValueError(f"--experts {E} must divide evenly over --ep {ep}.")
    if not 1 <= k <= E:
        raise ValueError(f"--topk {k} must be between 1 and --experts {E}.")
    if rpn < 1 or (ep % rpn and rpn % ep):
        raise ValueError(f"--ranks-per-node {rpn} and --ep {ep} do not tile: one must divide the other.")
    if not ns.trace:
        if ns.tokens < ep:
            raise ValueError(f"--tokens {ns.tokens} must be at least --ep {ep}.")
        g = torch.Generator().manual_seed(ns.seed)
        logits = torch.randn(ns.tokens, E, generator=g) + ns.skew * torch.randn(E, generator=g)
        src = torch.arange(ns.tokens) * ep // ns.tokens
        layers = {0: (logits, src)}
    meta = {"experts": E, "topk": k, "ep": ep, "ranks_per_node": rpn,
            "from_trace": bool(ns.trace), "source": source}
    return layers, meta


def _print_table(out: Dict) -> None:
    rows: List = [
        ("rows per token", out["rows_per_token"], out["stock_rows_per_token"]),
        ("  remote", out["remote_rows_per_token"], out["stock_remote_rows_per_token"]),
        ("  inter-node", out["inter_node_rows_per_token"], out["stock_inter_node_rows_per_token"]),
        ("distinct EP ranks per token", out["distinct_ranks_per_token"], None),
        ("expert load CV", out["load_cv"], out["stock_load_cv"]),
    ]
    head = f"{out['policy']}{' + dedup' if out['dedup'] else ''}"
    print(f"{out['tokens']} tokens, {out['experts']} experts, top-{out['topk']}, EP {out['ep']}, "
          f"{out['ranks_per_node']} EP ranks/node; {out['source']}")
    print(f"{'':30s}{head:>16s}{'stock top-k':>14s}")
    for name, a, b in rows:
        print(f"{name:30s}{a:16.3f}{'' if b is None else f'{b:14.3f}'}")
