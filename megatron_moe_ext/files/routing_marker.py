"""Routing marker (`moe_ext_routing.json` in a checkpoint folder): which routing policy trained
the checkpoint and which policy state its routers carry.

    {"router_policy": "c2r", "policy_state": ["c2r-warmup"]}

Written by rank 0 of a run into its --save folder; read before a run loads that folder, so that a
policy mismatch is named at start instead of surfacing as a KeyError over the whole state dict
(state missing) or as silently different training (state ignored). Pure JSON; the caller says
which state a run needs.

Policy state names (persistent router buffers that only some configurations have):
    "c2r-warmup":          C2R warm-up switch and learned partners (c2r_active, c2r_partners)
    "locmoe-bias-warmup":  LocMoE local-bias switch (locmoe_bias_on)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Union

MARKER = "moe_ext_routing.json"

# state name -> a key fragment of its tensors in a Megatron checkpoint, and how to say it
STATE_KEYS = {"c2r-warmup": "router.c2r_partners", "locmoe-bias-warmup": "router.locmoe_bias_on"}
STATE_WORDS = {"c2r-warmup": "C2R warm-up state (c2r_partners)",
               "locmoe-bias-warmup": "LocMoE local-bias warm-up state (locmoe_bias_on)"}


def write_routing_marker(checkpoint_dir: Union[str, Path], router_policy: str,
                         policy_state: List[str]) -> Path:
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / MARKER
    path.write_text(json.dumps({"router_policy": router_policy,
                                "policy_state": sorted(policy_state)}, indent=1))
    return path


def read_routing_marker(checkpoint_dir: Union[str, Path]) -> Optional[dict]:
    """The marker's content, or None if there is none (a plain Megatron checkpoint or one saved
    before markers existed) or it is unreadable (then nothing is known about the checkpoint)."""
    try:
        d = json.loads((Path(checkpoint_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("router_policy"), str):
        return None
    return {"router_policy": d["router_policy"], "policy_state": list(d.get("policy_state") or [])}


def routing_mismatch(load: str, marker: Optional[dict], ckpt_state: List[str], *, policy: str,
                     needs: List[str], finetune: bool) -> Optional[str]:
    """None if a run with `policy` needing state `needs` may load checkpoint `load`, else the
    reason (one sentence). `marker`: the checkpoint's routing marker or None; `ckpt_state`: the
    policy state its tensors hold (what actually gets loaded, marker or not).

    Refused: state the run needs but the checkpoint lacks (Megatron's loader would fail on the
    missing keys); a checkpoint trained with c2r/locmoe/locmoe-plus resumed with another policy,
    unless --finetune says a new run starts from its weights. Allowed: starting any policy from a
    top-k checkpoint (docs/c2r.md: C2R with a plan or default partners starts from top-k);
    `policy_change_note` says it."""
    trained = marker["router_policy"] if marker else None
    missing = [s for s in needs if s not in ckpt_state]
    if missing:
        how = f"was trained with --moe-router-policy {trained}" if trained else "was saved without it"
        fix = ("start the warm-up in a fresh run (no --load), or profile that checkpoint and train "
               "with --moe-c2r-plan PLAN.json (docs/c2r.md)") if missing[0] == "c2r-warmup" else \
            "drop --moe-locmoe-local-bias-warmup-steps or start without --load"
        return f"--load {load} holds no {STATE_WORDS[missing[0]]}: it {how}; {fix}."
    if trained and trained not in ("topk", policy) and not finetune:
        return (f"--load {load} was trained with --moe-router-policy {trained} but this run uses "
                f"{policy}; resume with --moe-router-policy {trained}, or add --finetune to start "
                f"a new run from its weights.")
    return None


def policy_change_note(load: str, marker: Optional[dict], policy: str) -> Optional[str]:
    """A line for the log when an allowed load changes the policy (top-k -> any, or --finetune)."""
    trained = marker["router_policy"] if marker else None
    if trained and trained != policy:
        return (f"--load {load} was trained with --moe-router-policy {trained}; this run continues "
                f"its weights with {policy}.")
    return None
