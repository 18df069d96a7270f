"""The results study's table, verdicts and plots, from the per-run JSON of benchmarks/quality_study.py.

    python benchmarks/study_report.py docs/results/quality_study_h200 [--png-dir DIR] [--json OUT]

Reads every `<row>_s<seed>.json` in the folder (completed runs only), groups them by row and prints
the markdown table of docs/results.md: validation loss mean and spread over seeds, perplexity of
the mean, the difference to top-k, rows per token at EP 8 (total / remote on one node, inter-node
on 2 nodes of 4), load CV, dropped tokens, tokens/s, and a verdict.

Spread and verdict (stated in the table's notes): the spread of a row is max - min over its seeds.
The noise a difference is judged against is the largest spread among top-k and the row (a row
run with one seed borrows top-k's). A row whose mean lies more than that noise above top-k's
"hurts", more than it below "helps", otherwise "no difference". tokens/s of runs that shared the
GPU with others (`concurrent_jobs` > 1) are not a single run's speed and are marked so.

Plots (`--png-dir`): study_loss_curves.png (validation loss over iterations, first seed of each
row) and study_traffic_vs_quality.png (inter-node rows per token on 2 x 4 against the validation
loss difference to top-k, with the spread as error bars).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quality_study import ROWS  # noqa: E402  (row order and names are the harness's)

TRAFFIC = ("ep8_1node_rows_per_token", "ep8_1node_remote_rows_per_token", "ep8_2x4_inter_node_rows_per_token")


def load_runs(folder: str) -> Dict[str, List[dict]]:
    """row -> completed runs (sorted by seed) from every `<row>_s<seed>.json` in `folder`."""
    runs: Dict[str, List[dict]] = {}
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".json") or fn.startswith("summary") or "_s" not in fn:
            continue
        with open(os.path.join(folder, fn)) as f:
            r = json.load(f)
        if r.get("completed") and r.get("valid_loss") is not None and r.get("row") in ROWS:
            runs.setdefault(r["row"], []).append(r)
    for v in runs.values():
        v.sort(key=lambda r: r["seed"])
    return runs


def _mean(vals: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def summarize(runs: Dict[str, List[dict]]) -> List[dict]:
    """One record per row, in the harness's row order, with the verdict against top-k."""
    out = []
    base = runs.get("topk")
    base_mean = _mean([r["valid_loss"] for r in base]) if base else None
    base_spread = (max(r["valid_loss"] for r in base) - min(r["valid_loss"] for r in base)) if base else None
    for name in ROWS:
        rs = runs.get(name)
        if not rs:
            continue
        losses = [r["valid_loss"] for r in rs]
        mean = statistics.fmean(losses)
        spread = max(losses) - min(losses) if len(rs) > 1 else None
        rec = {"row": name, "seeds": [r["seed"] for r in rs], "valid_loss_mean": mean,
               "valid_loss_spread": spread, "valid_losses": losses, "ppl_of_mean": math.exp(mean),
               "load_cv": _mean([r.get("load_cv") for r in rs]),
               "dropped": _mean([r.get("dropped_token_fraction") for r in rs]),
               "tokens_per_s": _mean([r.get("tokens_per_s") for r in rs]),
               "tokens_per_s_shared": any((r.get("concurrent_jobs") or 1) > 1 for r in rs)}
        for key in TRAFFIC:
            rec[key] = _mean([r.get(key) for r in rs])
        if base_mean is not None and name != "topk":
            noise_parts = [s for s in (base_spread if len(base) > 1 else None, spread) if s is not None]
            noise = max(noise_parts) if noise_parts else None
            delta = mean - base_mean
            rec.update(delta_vs_topk=delta, rel_vs_topk=delta / base_mean, noise=noise)
            if noise is None:
                rec["verdict"] = "unresolved (one seed each)"
            elif delta > noise:
                rec["verdict"] = "hurts"
            elif delta < -noise:
                rec["verdict"] = "helps"
            else:
                rec["verdict"] = "no difference"
        out.append(rec)
    return out


def table(records: List[dict]) -> str:
    def f(v, fmt, none=""):
        return none if v is None else format(v, fmt)

    head = ("| row | seeds | valid loss (mean +- spread/2) | PPL | vs top-k | rows/token EP 8 total / remote "
            "| inter-node 2x4 | load CV | dropped | tokens/s | verdict |")
    lines = [head, "|---" * 11 + "|"]
    for r in records:
        spread = r["valid_loss_spread"]
        loss = f"{r['valid_loss_mean']:.4f}" + (f" +- {spread / 2:.4f}" if spread is not None else "")
        vs = "-" if r["row"] == "topk" else f"{r['delta_vs_topk']:+.4f} ({100 * r['rel_vs_topk']:+.1f}%)"
        tps = f(r["tokens_per_s"], ",.0f") + (" *" if r["tokens_per_s_shared"] else "")
        lines.append("| " + " | ".join([
            f"`{r['row']}`", ",".join(map(str, r["seeds"])), loss, f"{r['ppl_of_mean']:.2f}", vs,
            f"{f(r['ep8_1node_rows_per_token'], '.3f')} / {f(r['ep8_1node_remote_rows_per_token'], '.3f')}",
            f(r["ep8_2x4_inter_node_rows_per_token"], ".3f"), f(r["load_cv"], ".3f"),
            f(r["dropped"], ".4f", "-"), tps, r.get("verdict", "-")]) + " |")
    return "\n".join(lines)


def plot(runs: Dict[str, List[dict]], records: List[dict], png_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(png_dir, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in ROWS:
        if name not in runs:
            continue
        curve = runs[name][0].get("valid_curve") or []
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label=f"{name} (s{runs[name][0]['seed']})")
    ax.set_xlabel("iteration (32 x 1024 tokens each)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(6.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Validation loss per row (one H200, same data order)")
    path = os.path.join(png_dir, "study_loss_curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in records:
        x = r.get("ep8_2x4_inter_node_rows_per_token")
        if x is None:
            continue
        y = r.get("delta_vs_topk", 0.0)
        err = (r["valid_loss_spread"] or 0) / 2
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3)
        ax.annotate(r["row"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("inter-node rows per token, EP 8 on 2 nodes x 4 (offline from the run's trace)")
    ax.set_ylabel("validation loss - top-k's (nats)")
    ax.grid(alpha=0.3)
    ax.set_title("Traffic against quality")
    path = os.path.join(png_dir, "study_traffic_vs_quality.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder of <row>_s<seed>.json files")
    ap.add_argument("--png-dir", help="write the two plots here")
    ap.add_argument("--json", help="write the per-row records here")
    args = ap.parse_args(argv)
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"{args.folder}: no completed <row>_s<seed>.json runs")
    records = summarize(runs)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.png_dir:
        for p in plot(runs, records, args.png_dir):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
