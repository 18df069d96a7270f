"""`megatron-moe-ext comm-volume`: all-to-all rows a routing policy sends, offline and deterministic.

Logits are synthetic (seeded) or come from a routing trace recorded in training
(`--save-routing-trace`). The policy picks experts from the scores training ranked (the trace
records the score function and the expert bias); `routing/volume.py` counts what the dispatcher
sends (one row per token-expert pair for Megatron's alltoall, one per token-rank pair with
`--dedup`), of which remote and inter-node, beside what stock top-k with the stock dispatcher
sends for the same logits.

Synthetic logits: standard normal per (token, expert) plus a per-expert popularity offset with
standard deviation `--skew` (0 = uniform experts). The T tokens start on the EP ranks in equal
contiguous blocks (block r on rank r).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

from megatron_moe_ext.errors import UserError
from megatron_moe_ext.routing.policies import POLICIES, get_policy


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "comm-volume", help="All-to-all rows per token that a routing policy sends (offline).",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="topk", choices=list(POLICIES))
    p.add_argument("--experts", type=int, help="number of experts (default: the trace's, else 64)")
    p.add_argument("--topk", type=int, help="experts per token (default: the trace's, else 4)")
    p.add_argument("--ep", type=int, help="expert-parallel size (default: the trace's, else 8)")
    p.add_argument("--ranks-per-node", type=int,
                   help="EP ranks per node (default: the trace's, else --ep, i.e. one node)")
    p.add_argument("--tokens", type=int, default=65536, help="synthetic tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skew", type=float, default=0.0, help="std of per-expert logit offsets")
    p.add_argument("--trace", help="routing trace file or folder instead of synthetic logits")
    p.add_argument("--router-num-groups", type=int, default=None, metavar="G",
                   help="Megatron's group-limited routing (--moe-router-num-groups) for --policy topk: "
                        "experts in G contiguous groups (devices)")
    p.add_argument("--router-group-topk", type=int, default=None, metavar="K",
                   help="groups a token may use (--moe-router-group-topk)")
    p.add_argument("--dedup", action="store_true",
                   help="count a rank-deduplicating dispatcher (one row per token and rank)")
    p.add_argument("--hidden", type=int, help="hidden size, to report bytes")
    p.add_argument("--bytes-per-element", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for policy in POLICIES.values():  # each policy's own options, from the registry
        for o in policy.offline_options:
            p.add_argument(f"--{o.flag}", type=o.type, default=None, metavar=o.metavar,
                           help=f"{o.help} (default {o.default})")
    p.set_defaults(func=run)


def _check_options(ns) -> Dict[str, object]:
    """The chosen policy's options (defaults filled in); another policy's option is refused."""
    options = {}
    for policy in POLICIES.values():
        for o in policy.offline_options:
            value = getattr(ns, o.flag.replace("-", "_"))
            if policy.name != ns.policy:
                if value is not None:
                    raise UserError(f"--{o.flag} applies to --policy {policy.name} only; add "
                                    f"--policy {policy.name} or drop the flag.")
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{o.flag} must be a finite number, got {value}.")
            options[o.flag.replace("-", "_")] = o.default if value is None else value
    return options


def run(ns: argparse.Namespace) -> int:

    from megatron_moe_ext.routing.policies.offline import OfflineContext
    from megatron_moe_ext.routing.policies.topk import offline_route as topk_route
    from megatron_moe_ext.routing.scores import selection_scores
    from megatron_moe_ext.routing.volume import dispatch_counts

    options = _check_options(ns)
    try:
        layers, meta = _load_inputs(ns)
    except ValueError as e:
        raise UserError(str(e)) from None
    topo = meta["topology"]
    k = meta["topk"]
    if options.get("plan"):
        from megatron_moe_ext.files.plan import load_plan

        options["plan"] = load_plan(options["plan"], num_experts=topo.num_experts,
                                    ep_size=topo.ep_size, topk=k)
    route = get_policy(ns.policy).offline_route()
    groups = _group_limit(ns, topo, k)
    if groups:
        route = _group_limited_route(*groups)
    per_layer: Dict[str, Dict] = {}
    total = total_stock = None
    for layer, (logits, src, scoring, affinity) in layers.items():
        scores = selection_scores(logits, **scoring)
        ctx = OfflineContext(topo, src, options=options, layer=layer, affinity=affinity)
        try:
            chosen = route(scores, k, ctx)
        except ValueError as e:
            raise UserError(str(e)) from None
        kw = dict(ep_size=topo.ep_size, ep_ranks_per_node=topo.ranks_per_node, src_ep_rank=src)
        counts = dispatch_counts(chosen, **kw)
        stock_counts = dispatch_counts(topk_route(scores, k, ctx), **kw)
        total = counts if total is None else total + counts
        total_stock = stock_counts if total_stock is None else total_stock + stock_counts
        if meta["from_trace"]:
            per_layer[str(layer)] = _figures(counts, stock_counts, ns)
    out = {"policy": ns.policy, "dedup": ns.dedup, "experts": topo.num_experts, "topk": k,
           "ep": topo.ep_size, "ranks_per_node": topo.ranks_per_node, "tokens": int(total[0].item()),
           "source": meta["source"], **_figures(total, total_stock, ns)}
    if per_layer:
        out["layers"] = per_layer
    if ns.json:
        print(json.dumps(out))
    else:
        _print_table(out)
    return 0


def _group_limit(ns, topo, k):
    """(G, K) for Megatron's group-limited top-k, checked; None when not asked for."""
    G, K = ns.router_num_groups, ns.router_group_topk
    if G is None and K is None:
        return None
    if G is None or K is None:
        raise UserError("--router-num-groups and --router-group-topk go together.")
    if ns.policy != "topk":
        raise UserError("--router-num-groups applies to --policy topk (Megatron's group-limited routing).")
    if G < 1 or topo.num_experts % G or not 1 <= K <= G or k % K or k > K * (topo.num_experts // G):
        raise UserError(f"--router-num-groups {G} --router-group-topk {K} do not fit {topo.num_experts} "
                        f"experts and top-{k} (G must divide the experts, K divide k, K groups hold k).")
    return G, K


def _group_limited_route(G: int, K: int):
    """Megatron's group_limited_topk on selection scores: a group's score is the sum of its top
    k/K scores; a token keeps its K best groups and takes its top-k experts there."""
    def route(scores, k, ctx):
        import torch

        from megatron_moe_ext.routing.policies.topk import indices_to_map

        T, E = scores.shape
        grouped = scores.view(T, G, E // G)
        group_score = grouped.topk(k // K, dim=-1).values.sum(dim=-1)
        keep = torch.zeros(T, G, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(K, dim=-1).indices, True)
        masked = scores.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        return indices_to_map(masked.topk(k, dim=-1).indices, E)
    return route


def _figures(counts, stock_counts, ns) -> Dict:
    from megatron_moe_ext.routing.volume import volume_from_counts

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


def _positive(flag: str, value, default):
    """A count flag: None means "not given" (0 is a value, and refused)."""
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{flag} must be a positive count, got {value}.")
    return value


def _load_inputs(ns):
    """-> ({layer: (logits [T, E], src_ep_rank [T], scoring kwargs, affinity or None)}, meta)
    after validating the flags."""
    import torch

    from megatron_moe_ext.routing.topology import EPTopology

    if not math.isfinite(ns.skew):
        raise ValueError(f"--skew must be a finite number, got {ns.skew}.")
    for flag, v in (("--experts", ns.experts), ("--topk", ns.topk), ("--ep", ns.ep),
                    ("--ranks-per-node", ns.ranks_per_node), ("--hidden", ns.hidden)):
        _positive(flag, v, None)
    if ns.trace:
        from megatron_moe_ext.files.trace import load_trace

        tr = load_trace(ns.trace)
        if ns.experts is not None and ns.experts != tr.num_experts:
            raise ValueError(f"--experts {ns.experts} does not match the trace's {tr.num_experts} ({tr.files[0]}).")
        # An EP-1 trace (one GPU) can be read at any --ep: its tokens are split into --ep
        # contiguous blocks, block r starting on rank r, as a data-parallel run would hold them.
        reinterpret = ns.ep is not None and tr.ep_size == 1 and ns.ep != 1
        if ns.ep is not None and ns.ep != tr.ep_size and not reinterpret:
            raise ValueError(f"--ep {ns.ep} does not match the trace's {tr.ep_size} ({tr.files[0]}); "
                             "only an EP-1 trace can be read at another --ep.")
        ranks = {int(r) for v in tr.src_ep_rank.values() for r in v.unique().tolist()}
        if Path(ns.trace).is_dir() and ranks != set(range(tr.ep_size)):
            missing = sorted(set(range(tr.ep_size)) - ranks)
            raise ValueError(f"--trace {ns.trace} holds no file for EP rank(s) {missing} of its "
                             f"{tr.ep_size}; record the trace on every rank or pass one rank's file.")
        E, ep, k = tr.num_experts, tr.ep_size, _positive("--topk", ns.topk, tr.topk)
        rpn = _positive("--ranks-per-node", ns.ranks_per_node, tr.ep_ranks_per_node)
        src_of = {layer: tr.src_ep_rank[layer] for layer in tr.logits}
        if reinterpret:
            ep = ns.ep
            if tr.layout_ep == ep:   # the run emulated EP ep: its sources and nodes are recorded
                rpn = _positive("--ranks-per-node", ns.ranks_per_node, tr.ep_ranks_per_node)
                src_of = dict(tr.layout_src)
            else:
                rpn = _positive("--ranks-per-node", ns.ranks_per_node, ep)
                src_of = {layer: torch.arange(len(lg)) * ep // len(lg) for layer, lg in tr.logits.items()}
        layers = {layer: (tr.logits[layer], src_of[layer], tr.scoring[layer], tr.affinity[layer])
                  for layer in tr.logits}
        source = f"trace:{ns.trace}" + (f" (EP 1 read at EP {ep})" if reinterpret else "")
        if reinterpret and tr.layout_ep == ep:
            source += ", with the source ranks its router emulated"
    else:
        E, k, ep = _positive("--experts", ns.experts, 64), _positive("--topk", ns.topk, 4), \
            _positive("--ep", ns.ep, 8)
        rpn = _positive("--ranks-per-node", ns.ranks_per_node, ep)
        source = f"synthetic(seed={ns.seed}, skew={ns.skew})"
    if E % ep:
        raise ValueError(f"--experts {E} must divide evenly over --ep {ep}.")
    if k > E:
        raise ValueError(f"--topk {k} must be at most --experts {E}.")
    if ep % rpn and rpn % ep:
        raise ValueError(f"--ranks-per-node {rpn} and --ep {ep} do not tile: one must divide the other.")
    if not ns.trace:
        if ns.tokens < ep:
            raise ValueError(f"--tokens {ns.tokens} must be at least --ep {ep}.")
        g = torch.Generator().manual_seed(ns.seed)
        logits = torch.randn(ns.tokens, E, generator=g) + ns.skew * torch.randn(E, generator=g)
        src = torch.arange(ns.tokens) * ep // ns.tokens
        layers = {0: (logits, src, {}, None)}
    meta = {"topology": EPTopology(E, ep, rpn), "topk": k, "from_trace": bool(ns.trace), "source": source}
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
