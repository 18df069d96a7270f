"""The results study's table, verdicts and plots, from the per-run JSON of benchmarks/quality_study.py.

    python benchmarks/study_report.py docs/results/quality_study_h200 [--png-dir DIR] [--json OUT]

Reads every `<row>_s<seed>.json` in the folder (completed runs only), groups them by row and prints
the markdown table of docs/results.md: validation loss mean and spread over seeds, perplexity of
the mean, the difference to top-k, rows per token at EP 8 (total / remote on one node, inter-node
on 2 nodes of 4; these are per routed pass of an MoE layer), the model's mean rows per token per
layer (that times the routed passes per layer: ScMoE pos2 routes in every other layer, DGMoE twice,
the dense control never), load CV, dropped tokens, tokens/s, and a verdict.

Spread and verdict (stated in the table's notes): the spread of a row is max - min over its
seeds. A row is compared with top-k seed by seed (same data order, the same evaluation batches):
its difference is the mean over its seeds of (row - top-k of that seed). The noise it is judged
against is the spread of those paired differences over its own seeds, or, for a row run with one
seed, the median of that spread over the rows that have two (its verdict then says "(one
seed)"). A difference above the noise "hurts", below minus the noise "helps", otherwise "no
difference". tokens/s of runs that shared the
GPU with others (`concurrent_jobs` > 1) are not a single run's speed: the column gives the mean
over a row's runs made alone, or, where it has none, the shared runs' figure marked `*`.

Plots (`--png-dir`): study_loss_curves.png (validation loss over iterations, first seed of each
row) and study_traffic_vs_quality.png (inter-node rows per token per model layer on 2 x 4 against the
validation loss difference to top-k, with the spread as error bars).
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


def traffic_share(name: str) -> float:
    """Routed passes per model layer, relative to a model whose every layer routes once: the rows
    per token of a row's trace are per routed pass of an MoE layer, and ScMoE pos2 routes in
    every other layer (--moe-layer-freq 2), DGMoE twice per layer."""
    flags = ROWS[name][0]
    share = 1.0
    if "--moe-layer-freq" in flags:
        share /= int(flags[flags.index("--moe-layer-freq") + 1])
    if "dgmoe" in flags:
        share *= 2
    return 0.0 if ROWS[name][2] == "dense" else share


def summarize(runs: Dict[str, List[dict]]) -> List[dict]:
    """One record per row, in the harness's row order, with the verdict against top-k."""
    base = {r["seed"]: r["valid_loss"] for r in runs.get("topk", [])}
    out = []
    for name in ROWS:
        rs = runs.get(name)
        if not rs:
            continue
        losses = [r["valid_loss"] for r in rs]
        mean = statistics.fmean(losses)
        rec = {"row": name, "seeds": [r["seed"] for r in rs], "valid_loss_mean": mean,
               "valid_loss_spread": max(losses) - min(losses) if len(rs) > 1 else None,
               "valid_losses": losses, "ppl_of_mean": math.exp(mean),
               "load_cv": _mean([r.get("load_cv") for r in rs]),
               "dropped": _mean([r.get("dropped_token_fraction") for r in rs]),
               "tokens_per_s_alone": _mean([r.get("tokens_per_s") for r in rs if (r.get("concurrent_jobs") or 1) == 1]),
               "tokens_per_s_shared": _mean([r.get("tokens_per_s") for r in rs if (r.get("concurrent_jobs") or 1) > 1])}
        for key in TRAFFIC:
            rec[key] = _mean([r.get(key) for r in rs])
        rec["layer_share"] = traffic_share(name)
        total = rec["ep8_1node_rows_per_token"]
        rec["model_rows_per_token_per_layer"] = 0.0 if rec["layer_share"] == 0 else (
            None if total is None else total * rec["layer_share"])
        # paired with top-k of the same seed: same data order and the same evaluation batches
        paired = [r["valid_loss"] - base[r["seed"]] for r in rs if r["seed"] in base]
        if name != "topk" and paired:
            rec["paired_deltas"] = paired
            rec["delta_vs_topk"] = statistics.fmean(paired)
            rec["rel_vs_topk"] = rec["delta_vs_topk"] / statistics.fmean(
                [base[r["seed"]] for r in rs if r["seed"] in base])
            rec["delta_spread"] = max(paired) - min(paired) if len(paired) > 1 else None
        out.append(rec)
    # the noise a one-seed row is judged against: the median spread of the measured paired deltas
    measured = sorted(r["delta_spread"] for r in out if r.get("delta_spread") is not None)
    typical = statistics.median(measured) if measured else None
    for rec in out:
        if "delta_vs_topk" not in rec:
            continue
        own = rec.get("delta_spread")
        noise = own if own is not None else typical
        rec["noise"], rec["noise_source"] = noise, ("own seeds" if own is not None else "typical")
        delta = rec["delta_vs_topk"]
        if noise is None:
            rec["verdict"] = "unresolved (one seed each)"
        elif delta > noise:
            rec["verdict"] = "hurts"
        elif delta < -noise:
            rec["verdict"] = "helps"
        else:
            rec["verdict"] = "no difference"
        if own is None and noise is not None:
            rec["verdict"] += " (one seed)"
    return out


def table(records: List[dict]) -> str:
    def f(v, fmt, none=""):
        return none if v is None else format(v, fmt)

    head = ("| row | seeds | valid loss (mean +- spread/2) | PPL | vs top-k | rows/token EP 8 total / remote "
            "| inter-node 2x4 | model rows/token/layer | load CV | dropped | tokens/s | verdict |")
    lines = [head, "|---" * 12 + "|"]
    for r in records:
        spread = r["valid_loss_spread"]
        loss = f"{r['valid_loss_mean']:.4f}" + (f" +- {spread / 2:.4f}" if spread is not None else "")
        vs = "-" if "delta_vs_topk" not in r else f"{r['delta_vs_topk']:+.4f} ({100 * r['rel_vs_topk']:+.1f}%)"
        tps = (f(r["tokens_per_s_alone"], ",.0f") if r["tokens_per_s_alone"] is not None
               else f(r["tokens_per_s_shared"], ",.0f") + " *")
        lines.append("| " + " | ".join([
            f"`{r['row']}`", ",".join(map(str, r["seeds"])), loss, f"{r['ppl_of_mean']:.2f}", vs,
            f"{f(r['ep8_1node_rows_per_token'], '.3f')} / {f(r['ep8_1node_remote_rows_per_token'], '.3f')}",
            f(r["ep8_2x4_inter_node_rows_per_token"], ".3f"), f(r["model_rows_per_token_per_layer"], ".3f"),
            f(r["load_cv"], ".3f"),
            f(r["dropped"], ".4f", "-"), tps, r.get("verdict", "-")]) + " |")
    return "\n".join(lines)


def plot(runs: Dict[str, List[dict]], records: List[dict], png_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(png_dir, exist_ok=True)
    written = []

    def save(name: str, fig) -> str:
        path = os.path.join(png_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(n for n in ROWS if n in runs):
        # the periodic evaluations; the final one (a second record at the last iteration, on the
        # next evaluation batches) is the table's number, drawn as a larger dot
        curve = runs[name][0].get("valid_curve") or []
        if not curve:
            continue
        periodic, final = curve[:-1], curve[-1]
        style = dict(color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], ls=("-", "--", ":")[i % 3])
        ax.plot([c[0] for c in periodic], [c[1] for c in periodic], marker=".", **style,
                label=f"{name} (s{runs[name][0]['seed']})")
        ax.plot([final[0] + 6], [final[1]], marker="o", color=style["color"])
    ax.set_xlabel("iteration (32 x 1024 tokens each)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(6.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Validation loss per row (one H200, same data order)")
    written.append(save("study_loss_curves.png", fig))

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points: Dict[tuple, List[str]] = {}
    for r in records:
        x = r.get("ep8_2x4_inter_node_rows_per_token")
        if x is None:
            continue
        x *= r["layer_share"]   # per layer of the model, as the table's model column
        y = r.get("delta_vs_topk", 0.0)
        err = (r.get("delta_spread") or 0) / 2
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3)
        points.setdefault((round(x, 2), round(y, 3)), []).append(r["row"])
    for (x, y), names in sorted(points.items()):   # rows at one point share a label
        near = any(abs(x - x2) < 0.05 and abs(y - y2) < 0.02 for (x2, y2) in points if (x2, y2) < (x, y))
        ax.annotate(" = ".join(names), (x, y), fontsize=7, textcoords="offset points",
                    xytext=(4, -11) if near else (4, 3))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("inter-node rows per token per model layer, EP 8 on 2 nodes x 4 (offline, from the run's trace)")
    ax.set_ylabel("validation loss - top-k's (nats)")
    ax.grid(alpha=0.3)
    ax.set_title("Traffic against quality")
    written.append(save("study_traffic_vs_quality.png", fig))
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
