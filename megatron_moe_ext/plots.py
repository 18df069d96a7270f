"""`megatron-moe-ext plot-metrics`: curves of logged metrics over training, from run logs.

    megatron-moe-ext plot-metrics runs/a/run_log.jsonl runs/b/run_log.jsonl \
        --keys "lm loss" moe_ext/dropped_token_fraction moe_ext/layer_1/expert_load --output m.png

Reads the JSON-lines run logs that `--moe-ext-run-log` writes (and the quickstart's run_log.jsonl).
One panel per key: a scalar key is one line per run; a list-valued key (per-expert load) is one line
per element, for the first run that has it. "valid:" before a key plots the validation records
(`valid:lm loss`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

VALID_PREFIX = "valid:"


def read_run_log(path: str) -> List[Dict]:
    """The records of a run log; a line that is not JSON stops with the file and line number."""
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path} line {n} is not a JSON record; is this a run log "
                                     "(--moe-ext-run-log)?") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable or not text: name the file
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(f"run log {path} cannot be read ({reason}).") from None
    return [r for r in rows if isinstance(r, dict)]


def series(rows: Sequence[Dict], key: str) -> Tuple[List[int], List]:
    """(iterations, values) of `key` in the train records (validation ones with "valid:")."""
    kind = "train"
    if key.startswith(VALID_PREFIX):
        kind, key = "valid", key[len(VALID_PREFIX):]
    pts = [(r["iteration"], r[key]) for r in rows
           if r.get("kind") == kind and key in r and isinstance(r[key], (int, float, list))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(run_logs: Sequence[str], keys: Sequence[str], output: str,
                 labels: Sequence[str] = ()) -> Dict[str, int]:
    """Write a PNG with one panel per key; returns the number of points drawn per key. When no
    key has a point, nothing is written (an empty figure would pass for a result)."""
    runs = [(labels[i] if i < len(labels) else os.path.basename(os.path.dirname(os.path.abspath(p))) or p,
             read_run_log(p)) for i, p in enumerate(run_logs)]
    if not any(series(rows, key)[0] for key in keys for _, rows in runs):
        return {key: 0 for key in keys}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    drawn: Dict[str, int] = {}
    for ax, key in zip(axes.flat, keys):
        drawn[key] = 0
        for label, rows in runs:
            its, vals = series(rows, key)
            if not its:
                continue
            if isinstance(vals[0], list):   # per-expert values: one line per expert, first run only
                for e in range(len(vals[0])):
                    ax.plot(its, [v[e] for v in vals], lw=1, label=f"expert {e}")
                drawn[key] += len(its)
                ax.set_title(f"{key} ({label})", fontsize=9)
                break
            ax.plot(its, vals, "o-" if key.startswith(VALID_PREFIX) else "-", lw=1, ms=3, label=label)
            drawn[key] += len(its)
            ax.set_title(key, fontsize=9)
        if not drawn[key]:
            ax.text(0.5, 0.5, f"{key}: not in these logs", ha="center", va="center", fontsize=8)
        ax.set_xlabel("iteration")
        if drawn[key]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn
