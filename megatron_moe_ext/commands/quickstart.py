"""`megatron-moe-ext quickstart`: train a tiny GPT-MoE with expert parallelism on the shipped corpus.

It runs the plugin's real pretrain entry (Megatron's `pretrain()` loop) under torchrun: on a GPU
machine on the GPUs, on a CPU-only machine on 2 gloo ranks through the compatibility layer. It
prepares the data (cached), shows progress, prints train/validation loss and the `moe_ext/*`
metrics, and writes `summary.json` and `quickstart.png` (loss curves and per-expert load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron_moe_ext.errors import UserError

DEFAULT_OUTPUT = "runs/quickstart"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="Train a tiny GPT-MoE (EP=2) on the shipped corpus and summarise it.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT,
                   help=f"Where data, checkpoints, logs, summary.json and the plot go (default {DEFAULT_OUTPUT}).")
    p.add_argument("--train-iters", type=int, default=500)
    p.add_argument("--nproc", type=int, default=2,
                   help="Ranks (= expert-parallel size); GPUs if CUDA is available, else gloo CPU ranks.")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--router-policy", default="topk", help="--moe-router-policy for the run.")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="Further Megatron/plugin flags, passed through unchanged (put last).")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    import torch

    from megatron_moe_ext.training.data import prepare_data
    from megatron_moe_ext.training.quickstart import (
        free_port,
        plot_run,
        print_summary,
        quickstart_flags,
        run_with_progress,
        summarize,
    )

    on_gpu = torch.cuda.is_available()
    nproc = min(ns.nproc, torch.cuda.device_count()) if on_gpu else ns.nproc
    # everything the run will need of these flags, before data preparation and the launch
    _check_flags(ns, nproc)
    out = _output_dir(ns.output_dir)
    print(f"[quickstart] {'GPU' if on_gpu else 'CPU (gloo, compatibility layer)'}: "
          f"{nproc} ranks, expert-parallel size {nproc}; output in {out}", flush=True)

    t0 = time.time()
    data = prepare_data(out / "data")
    print(f"[quickstart] data ready in {time.time() - t0:.0f}s: {data}", flush=True)

    run_log = out / "run_log.jsonl"
    if run_log.exists():
        run_log.unlink()  # a fresh run; checkpoints of earlier runs are left in place
    flags = quickstart_flags(data.megatron_args(), out, train_iters=ns.train_iters, nproc=nproc,
                             experts=ns.experts, topk=ns.topk, router_policy=ns.router_policy,
                             on_gpu=on_gpu) + list(ns.extra)
    # A fresh run each time: don't resume from a previous quickstart's checkpoint.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "megatron_moe_ext.training.pretrain_gpt", *flags]
    t1 = time.time()
    rc = run_with_progress(cmd, out / "train.log", ns.train_iters)
    train_seconds = time.time() - t1
    if rc != 0:
        cause = _last_error_line(out / "train.log")
        print(f"[quickstart] training failed (exit {rc}); the full log is {out / 'train.log'}"
              + (f"\n[quickstart] {cause}" if cause else ""), file=sys.stderr)
        return rc

    summary = summarize(run_log, train_seconds=train_seconds, command=cmd, on_gpu=on_gpu,
                        nproc=nproc)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_path = out / "quickstart.png"
    plot_run(run_log, plot_path)
    print_summary(summary, out, plot_path)
    return 0 if summary["loss_fell"] else 1


def _check_flags(ns: argparse.Namespace, nproc: int) -> None:
    """The quickstart's own flags, as the run will use them (nproc: ranks after the GPU count)."""
    from megatron_moe_ext.routing.policies import POLICY_NAMES

    for flag, value in (("--train-iters", ns.train_iters), ("--nproc", ns.nproc),
                        ("--experts", ns.experts), ("--topk", ns.topk)):
        if value < 1:
            raise UserError(f"{flag} must be a positive number, got {value}.")
    if ns.experts % nproc:
        raise UserError(f"--experts {ns.experts} must divide evenly over the {nproc} ranks "
                        f"(expert-parallel size); use a multiple of {nproc}.")
    if ns.topk > ns.experts:
        raise UserError(f"--topk {ns.topk} must be at most --experts {ns.experts}.")
    if ns.router_policy not in POLICY_NAMES:
        raise UserError(f"--router-policy {ns.router_policy!r} is not one of {', '.join(POLICY_NAMES)}.")


def _output_dir(path: str) -> Path:
    """--output-dir as a folder that exists and can be written (created if new)."""
    out = Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {path} is an existing file; give a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {path} cannot be created ({e.strerror or type(e).__name__}).") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--output-dir {path} is not writable.")
    return out


def _last_error_line(log: Path):
    """The entry's one-sentence refusal (`...: error: ...`) from the training log, if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.strip() for line in lines if ": error: " in line]
    return errors[-1] if errors else None
