"""Routing traces: router logits recorded during training, for offline `comm-volume --trace`.

One file per (iteration, rank), `routing_trace_iter{N:07d}_rank{R:05d}.pt`, a `torch.save`d dict:
    schema "megatron-moe-ext/routing-trace", version 2, iteration, num_experts, topk, ep_size,
    ep_rank, ep_ranks_per_node, layers {layer_number: {"logits": FloatTensor[T, E],
    "score_function": str, "pre_softmax": bool, "expert_bias": FloatTensor[E] or None,
    "hidden_norm": FloatTensor[T], "gate_norm": FloatTensor[E]}}, and for an EP-1 run emulating
    EP N's sources (`--moe-locmoe-layout-ep N`) "layout_ep": N and "layout_src": LongTensor[T].
The scoring fields let offline selection rank what training ranked (sigmoid scores plus expert
bias, not raw logits); the norms give the cosine affinities LocMoE+ routes by. Version 1 files
(layers {layer_number: logits}) still load, as softmax routing without affinities. Plain tensors
and Python values only, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from megatron_moe_ext.errors import UserError

SCHEMA = "megatron-moe-ext/routing-trace"
VERSION = 2
_READABLE = (1, 2)
_META = ("iteration", "num_experts", "topk", "ep_size", "ep_rank", "ep_ranks_per_node")


class TraceError(UserError):
    """A trace file that cannot be used; the message names the file and the problem."""


def trace_path(directory: Union[str, Path], iteration: int, rank: int) -> Path:
    return Path(directory) / f"routing_trace_iter{iteration:07d}_rank{rank:05d}.pt"


def save_trace(path: Union[str, Path], layers: Dict[int, Union[torch.Tensor, dict]], **meta) -> Path:
    """Write one rank's routing per layer ({layer_number: entry dict as above, or logits [T, E]
    alone for softmax routing}) with the metadata in `_META`."""
    missing = [k for k in _META if k not in meta]
    if missing:
        raise ValueError(f"save_trace needs {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {int(k): _entry(v) for k, v in layers.items()}
    torch.save({"schema": SCHEMA, "version": VERSION, **{k: int(meta[k]) for k in _META},
                "layers": entries}, path)
    return path


def _entry(v: Union[torch.Tensor, dict]) -> dict:
    d = {"logits": v} if isinstance(v, torch.Tensor) else dict(v)
    d.setdefault("score_function", "softmax")
    d.setdefault("pre_softmax", False)
    d.setdefault("expert_bias", None)
    for k in ("logits", "expert_bias", "hidden_norm", "gate_norm"):
        if isinstance(d.get(k), torch.Tensor):
            d[k] = d[k].detach().float().cpu()
    if isinstance(d.get("layout_src"), torch.Tensor):
        d["layout_src"] = d["layout_src"].detach().long().cpu()
    return d


@dataclass
class RoutingTrace:
    """Logits of every recorded token per layer, with the EP rank each token started on."""

    num_experts: int
    topk: int
    ep_size: int
    ep_ranks_per_node: int
    logits: Dict[int, torch.Tensor]        # layer -> FloatTensor[T, E]
    src_ep_rank: Dict[int, torch.Tensor]   # layer -> LongTensor[T]
    files: List[Path]
    scoring: Dict[int, dict] = None        # layer -> {score_function, pre_softmax, expert_bias}
    affinity: Dict[int, Optional[torch.Tensor]] = None  # layer -> FloatTensor[T, E] cosines, or None
    layout_ep: Optional[int] = None        # an EP-1 run's emulated EP size (--moe-locmoe-layout-ep)
    layout_src: Dict[int, torch.Tensor] = None  # layer -> LongTensor[T], the emulated source ranks


def load_trace(path: Union[str, Path]) -> RoutingTrace:
    """Read a trace file, or every trace file of a folder (ranks and iterations concatenated)."""
    path = Path(path)
    files = sorted(path.glob("routing_trace_*.pt")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise TraceError(f"{path}: no routing trace found (expected routing_trace_*.pt files).")
    first, logits, src, scoring, aff, lsrc, layout = None, {}, {}, {}, {}, {}, set()
    for f in files:
        try:
            d = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a file that is not a torch save
            raise TraceError(f"{f}: not a readable routing trace ({type(e).__name__}).") from e
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise TraceError(f"{f}: not a megatron-moe-ext routing trace (schema {d.get('schema') if isinstance(d, dict) else None!r}).")
        if d.get("version") not in _READABLE:
            raise TraceError(f"{f}: routing-trace version {d.get('version')} is not one of the "
                             f"supported {', '.join(map(str, _READABLE))}.")
        if first is None:
            first = d
        for k in ("num_experts", "topk", "ep_size", "ep_ranks_per_node"):
            if d[k] != first[k]:
                raise TraceError(f"{f}: {k} is {d[k]} but {files[0].name} has {first[k]}; "
                                 "traces of different runs cannot be combined.")
        for layer, raw in d["layers"].items():
            e = _entry(raw)
            lg = e["logits"]
            if lg.ndim != 2 or lg.shape[1] != d["num_experts"]:
                raise TraceError(f"{f}: layer {layer} logits have shape {tuple(lg.shape)}, "
                                 f"expected [tokens, {d['num_experts']}].")
            logits.setdefault(layer, []).append(lg)
            src.setdefault(layer, []).append(torch.full((lg.shape[0],), d["ep_rank"], dtype=torch.long))
            # ranks share a layer's scoring (the expert bias is all-reduced); keep the first
            scoring.setdefault(layer, {k: e[k] for k in ("score_function", "pre_softmax", "expert_bias")})
            has_norms = e.get("hidden_norm") is not None and e.get("gate_norm") is not None
            layout.add(e.get("layout_ep"))
            lsrc.setdefault(layer, []).append(e.get("layout_src"))
            aff.setdefault(layer, []).append(
                lg / (e["hidden_norm"][:, None] * e["gate_norm"][None, :]).clamp_min(1e-12)
                if has_norms else None)
    affinity = {k: (torch.cat(v) if all(a is not None for a in v) else None) for k, v in sorted(aff.items())}
    layout_ep, layout_src = None, None
    if len(layout) == 1 and None not in layout:   # every entry of every file emulated one layout
        layout_ep, layout_src = layout.pop(), {k: torch.cat(v) for k, v in sorted(lsrc.items())}
    return RoutingTrace(first["num_experts"], first["topk"], first["ep_size"],
                        first["ep_ranks_per_node"],
                        {k: torch.cat(v) for k, v in sorted(logits.items())},
                        {k: torch.cat(v) for k, v in sorted(src.items())}, files, scoring, affinity,
                        layout_ep, layout_src)
