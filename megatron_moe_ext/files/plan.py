"""C2R files: the collaboration profile and the placement plan (versioned JSON, matrices as .npy).

Profile (`profile.json` in a folder, one `coact_layer{NNN}.npy` per MoE layer):
    {"schema": "megatron-moe-ext/collaboration-profile", "version": 1, "num_experts", "topk",
     "tokens", "layers": {"<layer>": {"coactivation": "coact_layer001.npy", "metrics": {...}}}}
Plan (one JSON file):
    {"schema": "megatron-moe-ext/c2r-plan", "version": 1, "num_experts", "ep_size", "top_t",
     "co_resident_only", "profile", "layers": {"<layer>": {"expert_to_slot": [E],
     "partners": [[top_t] x E], "intra_rank_fraction": {"planned", "identity", "random"}}}}
`partners` are indexed by *physical slot* (row = slot, entries = slots): after
`apply-placement` moved expert e to slot expert_to_slot[e], router column j is slot j, and that
is what the C2R router reads. Every check raises PlanError naming the file and the mismatch.

Placement marker (`moe_ext_placement.json` in a checkpoint folder): which plan (path and sha256)
put the checkpoint's experts in their slots: written by `apply-placement` and by a run trained
with a plan, checked before training with a plan that moves experts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from megatron_moe_ext.errors import UserError

PROFILE_SCHEMA = "megatron-moe-ext/collaboration-profile"
PLAN_SCHEMA = "megatron-moe-ext/c2r-plan"
VERSION = 1


class PlanError(UserError):
    """An unusable profile or plan file; the message names the file and what is wrong."""


@dataclass
class Profile:
    num_experts: int
    topk: int
    tokens: int
    coactivation: Dict[int, torch.Tensor]   # layer -> Float64Tensor[E, E]
    metrics: Dict[int, dict]


@dataclass
class Plan:
    num_experts: int
    ep_size: int
    top_t: int
    co_resident_only: bool
    expert_to_slot: Dict[int, torch.Tensor]  # layer -> LongTensor[E]
    partners: Dict[int, torch.Tensor]        # layer -> LongTensor[E, top_t], physical slots
    path: Optional[str] = None


def save_profile(directory: Union[str, Path], coact: Dict[int, torch.Tensor], *, topk: int,
                 tokens: int, metrics: Dict[int, dict], overwrite: bool = False) -> Path:
    d = Path(directory)
    path = d / "profile.json"
    if path.exists() and not overwrite:
        raise PlanError(f"{path} exists; choose another --output or remove it first.")
    d.mkdir(parents=True, exist_ok=True)
    layers = {}
    for layer, c in sorted(coact.items()):
        name = f"coact_layer{layer:03d}.npy"
        np.save(d / name, c.double().cpu().numpy())
        layers[str(layer)] = {"coactivation": name, "metrics": metrics.get(layer, {})}
    num_experts = next(iter(coact.values())).shape[0]
    path.write_text(json.dumps({"schema": PROFILE_SCHEMA, "version": VERSION,
                                "num_experts": num_experts, "topk": topk, "tokens": tokens,
                                "layers": layers}, indent=1))
    return path


def _read_json(path: Path, schema: str, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such {what} file.") from None
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: not a {what} file ({type(e).__name__}).") from e
    if not isinstance(d, dict) or d.get("schema") != schema:
        raise PlanError(f"{path}: not a megatron-moe-ext {what} (schema {d.get('schema') if isinstance(d, dict) else None!r}).")
    if d.get("version") != VERSION:
        raise PlanError(f"{path}: {what} version {d.get('version')} is not the supported {VERSION}.")
    return d


def load_profile(path: Union[str, Path]) -> Profile:
    p = Path(path)
    if p.is_dir():
        p = p / "profile.json"
    d = _read_json(p, PROFILE_SCHEMA, "collaboration profile")
    E = d["num_experts"]
    coact, metrics = {}, {}
    for layer, entry in d["layers"].items():
        f = p.parent / entry["coactivation"]
        try:
            m = torch.from_numpy(np.load(f))
        except (OSError, ValueError) as e:
            raise PlanError(f"{f}: cannot read the co-activation matrix of layer {layer} ({e}).") from e
        if m.shape != (E, E):
            raise PlanError(f"{f}: shape {tuple(m.shape)} but the profile has {E} experts.")
        coact[int(layer)] = m
        metrics[int(layer)] = entry.get("metrics", {})
    return Profile(E, d["topk"], d["tokens"], coact, metrics)


def save_plan(path: Union[str, Path], plan: Plan, *, report: Dict[int, dict], profile: str,
              overwrite: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not overwrite:
        raise PlanError(f"{p} exists; choose another --output or pass --overwrite.")
    layers = {str(layer): {"expert_to_slot": plan.expert_to_slot[layer].tolist(),
                           "partners": plan.partners[layer].tolist(),
                           "intra_rank_fraction": report.get(layer, {})}
              for layer in sorted(plan.partners)}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"schema": PLAN_SCHEMA, "version": VERSION,
                             "num_experts": plan.num_experts, "ep_size": plan.ep_size,
                             "top_t": plan.top_t, "co_resident_only": plan.co_resident_only,
                             "profile": profile, "layers": layers}, indent=1))
    return p


def load_plan(path: Union[str, Path], *, num_experts: Optional[int] = None,
              ep_size: Optional[int] = None, topk: Optional[int] = None) -> Plan:
    """Read and check a plan against the model it is meant for (any check may be skipped)."""
    p = Path(path)
    d = _read_json(p, PLAN_SCHEMA, "C2R plan")
    E, ep, T = d["num_experts"], d["ep_size"], d["top_t"]
    if num_experts is not None and E != num_experts:
        raise PlanError(f"{p}: the plan is for {E} experts but the model has {num_experts} (--num-experts).")
    if ep_size is not None and ep != ep_size:
        raise PlanError(f"{p}: the plan is for expert-parallel size {ep} but the run uses {ep_size} "
                        "(--expert-model-parallel-size).")
    if topk is not None and T < topk - 1:
        raise PlanError(f"{p}: top_t {T} is less than k-1 = {topk - 1} (--moe-router-topk {topk}).")
    slots, partners = {}, {}
    for layer, entry in d["layers"].items():
        s = torch.tensor(entry["expert_to_slot"], dtype=torch.long)
        q = torch.tensor(entry["partners"], dtype=torch.long)
        if sorted(s.tolist()) != list(range(E)):
            raise PlanError(f"{p}: layer {layer} expert_to_slot is not a permutation of 0..{E - 1}.")
        if q.shape != (E, T) or (q.numel() and (q.min() < 0 or q.max() >= E)):
            raise PlanError(f"{p}: layer {layer} partners have shape {tuple(q.shape)} or ids out of "
                            f"range; expected [{E}, {T}] slots.")
        slots[int(layer)], partners[int(layer)] = s, q
    return Plan(E, ep, T, bool(d["co_resident_only"]), slots, partners, str(p))


MARKER = "moe_ext_placement.json"


def plan_sha256(path: Union[str, Path]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_placement_marker(checkpoint_dir: Union[str, Path], plan_path: Union[str, Path], **extra) -> Path:
    """Record in `checkpoint_dir` that its experts sit where `plan_path` put them."""
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / MARKER
    path.write_text(json.dumps({"plan": str(Path(plan_path).resolve()), "plan_sha256": plan_sha256(plan_path),
                                **extra}, indent=1))
    return path


def check_plan_applied(load: Optional[str], plan_path: str) -> Optional[str]:
    """None if training with `plan_path` from checkpoint `load` is consistent, else the reason.

    A plan that moves experts needs a checkpoint re-placed by that very plan (apply-placement
    leaves a marker); an identity plan (--keep-placement) needs nothing."""
    plan = load_plan(plan_path)
    if all(torch.equal(s, torch.arange(plan.num_experts)) for s in plan.expert_to_slot.values()):
        return None
    marker = Path(load) / MARKER if load else None
    if marker is None or not marker.exists():
        return (f"{plan_path} moves experts, but {load or 'no --load'} was not re-placed by it; run "
                "`megatron-moe-ext apply-placement` first (or plan with --keep-placement).")
    if json.loads(marker.read_text()).get("plan_sha256") != plan_sha256(plan_path):
        return f"{load} was re-placed by a different plan than {plan_path}."
    return None
