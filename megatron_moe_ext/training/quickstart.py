"""The quickstart's pieces: its Megatron command line, a progress display over the training log,
the run summary and its plot (the verb is `commands/quickstart.py`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

_ITER_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+)")


def quickstart_flags(data_args: List[str], out: Path, *, train_iters: int, nproc: int,
                     experts: int, topk: int, router_policy: str, on_gpu: bool) -> List[str]:
    """The full pretrain command line (after the module name) for the quickstart run."""
    from megatron_moe_ext.training.presets import tiny_moe_flags

    flags = [] if on_gpu else ["--cpu"]
    flags += tiny_moe_flags(num_layers=4, hidden=128, experts=experts, topk=topk, ep=nproc,
                            seq_length=128)
    flags += data_args
    flags += [
        "--micro-batch-size", "4", "--global-batch-size", str(4 * nproc),
        "--train-iters", str(train_iters),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, train_iters // 20)), "--weight-decay", "0.01",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--log-interval", "10", "--eval-interval", str(max(1, train_iters // 4)), "--eval-iters", "4",
        "--save", str(out / "checkpoints"), "--save-interval", str(train_iters),
        "--moe-router-policy", router_policy,
        "--moe-ext-run-log", str(out / "run_log.jsonl"),
        "--seed", "1234",
    ]
    if on_gpu:
        from megatron_moe_ext.compat.presets import LOCAL_IMPL_FLAGS

        flags += ["--bf16"]
        if importlib.util.find_spec("transformer_engine") is None:
            flags += LOCAL_IMPL_FLAGS
    return flags


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with_progress(cmd: List[str], log_path: Path, total: int) -> int:
    """Run `cmd`, keep its whole output in `log_path`, show a progress bar and the key lines."""
    from tqdm import tqdm

    # One thread per rank, always: the thread count changes how reductions are split and so the
    # losses' last bits (docs/reproducibility.md), and many environments set OMP_NUM_THREADS.
    given = os.environ.get("OMP_NUM_THREADS")
    if given not in (None, "1"):
        print(f"[quickstart] OMP_NUM_THREADS={given} is overridden with 1 so that the losses repeat "
              "(docs/reproducibility.md)", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log, tqdm(total=total, desc="training", unit="it",
                                          file=sys.stdout, dynamic_ncols=True) as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            m = _ITER_RE.search(line)
            if m:
                bar.update(int(m.group(1)) - bar.n)
                loss = re.search(r"lm loss: ([0-9.E+-]+)", line)
                if loss:
                    bar.set_postfix(loss=f"{float(loss.group(1)):.3f}")
            elif "validation loss at" in line or line.startswith(" moe_ext |"):
                bar.write(line.rstrip())
        return proc.wait()


def _read_log(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(run_log: Path, **extra) -> Dict:
    """Summary of a run log: first/last train loss, validation losses, averaged moe_ext metrics."""
    rows = _read_log(run_log)
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    if not train:
        raise RuntimeError(f"{run_log} has no training iterations; see train.log beside it.")
    metric_rows = [r for r in train if any(k.startswith("moe_ext/") for k in r)]
    metrics: Dict[str, float] = {}
    for key in sorted({k for r in metric_rows for k in r if k.startswith("moe_ext/")}):
        vals = [r[key] for r in metric_rows if isinstance(r.get(key), (int, float))]
        if vals:
            metrics[key] = sum(vals) / len(vals)
    window = max(1, len(train) // 10)
    first = sum(r["lm loss"] for r in train[:window]) / window
    last = sum(r["lm loss"] for r in train[-window:]) / window
    loss_fell = last < first and (len(valid) < 2 or valid[-1]["lm loss"] < valid[0]["lm loss"])
    return {
        "iterations": train[-1]["iteration"],
        "train_loss_first": first,
        "train_loss_last": last,
        "valid_loss": [(r["iteration"], r["lm loss"]) for r in valid],
        "loss_fell": loss_fell,
        "moe_ext_metrics_mean": metrics,
        "expert_load_last": _last_expert_load(train),
        **extra,
    }


def _last_expert_load(train: List[Dict]) -> Dict[str, List[float]]:
    for r in reversed(train):
        loads = {k: v for k, v in r.items() if k.endswith("expert_load") and isinstance(v, list)}
        if loads:
            return loads
    return {}


def plot_run(run_log: Path, png: Path) -> None:
    """Loss curves (train, validation) and the per-expert load of the last logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_log(run_log)
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    loads = _last_expert_load(train)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot([r["iteration"] for r in train], [r["lm loss"] for r in train], lw=1, label="train")
    if valid:
        ax.plot([r["iteration"] for r in valid], [r["lm loss"] for r in valid], "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    if loads:
        n = len(loads)
        width = 0.8 / n
        for i, (name, load) in enumerate(sorted(loads.items())):
            xs = [e + i * width for e in range(len(load))]
            ax.bar(xs, load, width=width, label=name.removeprefix("moe_ext/").removesuffix("/expert_load") or "all")
        ax.set_xlabel("expert")
        ax.set_ylabel("share of routed tokens")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no expert-load metrics logged", ha="center", va="center")
    ax.set_title("per-expert load (last logged step)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_summary(summary: Dict, out: Path, png: Path) -> None:
    print("\n[quickstart] done")
    print(f"  train loss: {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f}")
    if summary["valid_loss"]:
        v = summary["valid_loss"]
        print(f"  validation loss: {v[0][1]:.3f} (iter {v[0][0]}) -> {v[-1][1]:.3f} (iter {v[-1][0]})")
    for k, val in summary["moe_ext_metrics_mean"].items():
        if "/layer_" not in k:
            print(f"  {k}: {val:.4g}")
    print(f"  loss fell: {summary['loss_fell']}")
    print(f"  wrote {out / 'summary.json'} and {png}")
