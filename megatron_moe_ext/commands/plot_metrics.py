"""`megatron-moe-ext plot-metrics`: curves of logged metrics from run logs (library: `plots.py`)."""

from __future__ import annotations

import os

from megatron_moe_ext.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("plot-metrics", help="plot logged metrics over training from run logs")
    p.add_argument("run_logs", nargs="+", metavar="RUN_LOG", help="JSON-lines run logs (--moe-ext-run-log)")
    p.add_argument("--keys", nargs="+", required=True,
                   help='metric keys, e.g. "lm loss" "valid:lm loss" moe_ext/layer_1/expert_load')
    p.add_argument("--labels", nargs="*", default=(), help="one legend label per run log")
    p.add_argument("--output", required=True, metavar="PNG")
    p.set_defaults(func=run)


def run(ns) -> int:
    from megatron_moe_ext.plots import plot_metrics

    out = os.path.abspath(ns.output)
    if any(os.path.abspath(p) == out for p in ns.run_logs):
        raise UserError(f"--output {ns.output} is one of the run logs; choose another path.")
    missing = [p for p in ns.run_logs if not os.path.isfile(p)]  # also a folder
    if missing:
        raise UserError(f"run log {missing[0]} does not exist.")
    _check_output(ns.output)
    try:
        drawn = plot_metrics(ns.run_logs, ns.keys, ns.output, ns.labels)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not any(drawn.values()):
        raise UserError(f"none of --keys {' '.join(ns.keys)} is in the run logs' train or "
                        f"validation records; nothing was written to {ns.output}.")
    for key, n in drawn.items():
        print(f"{key}: {n} points" if n else f"{key}: not found in the run logs")
    print(f"wrote {ns.output}")
    return 0


def _check_output(output: str) -> None:
    """The PNG's folder exists and is writable, checked before the logs are read and drawn."""
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; give a PNG file path.")
    if not os.path.isdir(folder):
        raise UserError(f"--output {output}: folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--output {output}: folder {folder} is not writable.")
