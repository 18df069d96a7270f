"""docs/performance.md section 3's tables from benchmarks/moe_layer.py's JSON (and, optionally,
ep_step_time.py's): one command from the GPU run's files to the Markdown.

    python benchmarks/layer_speed_report.py docs/results/layer_speed_h200/moe_layer.json \
        [--step docs/results/layer_speed_h200/ep_step_time.json] [--floor-ms 0.92,3.21,26.69]

Per shape: every layer row with ms, x floor, percent of the BF16 matmul rate measured in the same
run, and the fraction of the step the GPU is busy (kernel-time sum / wall, with --kernels); then
the router rows (eager ms, busy, and the CUDA-graph ms). The floor is the run's own `floor` row
unless --floor-ms gives one per shape, in the JSON's shape order (the 2026-12-01 run's floor row
accumulated gradients, so its table uses the issue's floor figures).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional


def _cell(v: Optional[float], fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def layer_table(shape: str, rows: dict, floor_ms: float) -> List[str]:
    """Markdown lines: the layer rows (those with `ms`) of one shape, against `floor_ms`."""
    out = [f"**{shape}** (floor {floor_ms:.2f} ms)", "",
           "| row | ms | x floor | % of matmul rate | GPU busy |", "|---|---|---|---|---|"]
    for name, v in rows.items():
        if name == "floor" or "ms" not in v:
            if "error" in v and not name.startswith("router"):
                out.append(f"| {name} | error: {v['error'][:80]} | | | |")
            continue
        out.append(f"| {name} | {v['ms']:.2f} | {v['ms'] / floor_ms:.2f}x | {_cell(v.get('peak_fraction'), '.1%')} "
                   f"| {_cell(v.get('gpu_busy'), '.0%')} |")
    return out


def router_table(rows: dict) -> List[str]:
    """Markdown lines: each router row's eager ms and busy fraction, and its CUDA-graph ms."""
    out = ["| router | eager ms | GPU busy | kernel ms | CUDA graph ms |", "|---|---|---|---|---|"]
    suffix = ", cuda graph"
    for name, v in rows.items():
        if not name.startswith("router") or (name.endswith(suffix) and name[:-len(suffix)] in rows):
            continue
        if name.endswith(suffix):   # captured only (no eager row of its own)
            out.append(f"| {name[len('router '):-len(suffix)]} | | | | {_cell(v.get('router_ms'), '.3f')} |")
            continue
        graph = rows.get(name + suffix, {})
        kernel = v.get("kernels", {}).get("kernel_sum_ms")
        out.append(f"| {name[len('router '):]} | {_cell(v.get('router_ms'), '.3f')} | {_cell(v.get('gpu_busy'), '.0%')} "
                   f"| {_cell(kernel, '.3f')} | {_cell(graph.get('router_ms'), '.3f')} |")
    return out


def step_table(step: dict) -> List[str]:
    """Markdown lines: ep_step_time rows with step ms, speed-up over the first completed row, and
    the GPU-busy fraction of the step."""
    out = ["| row | step ms (min) | vs first | GPU busy |", "|---|---|---|---|"]
    base = None
    for r in step["rows"]:
        ms = r.get("step_ms")
        if ms is None:
            out.append(f"| {r['row']} | {r['rc'] if isinstance(r['rc'], str) else 'failed (rc ' + str(r['rc']) + ')'} | | |")
            continue
        base = base or ms
        busy = r.get("gpu_busy_ms_per_step")
        out.append(f"| {r['row']} | {ms:.0f} ({r['step_ms_min']:.0f}) | {base / ms:.3f}x "
                   f"| {'' if busy is None else f'{busy:.0f} ms ({busy / ms:.0%})'} |")
    return out


def report(layer: dict, floor_ms: Optional[List[float]] = None, step: Optional[dict] = None) -> str:
    lines = [f"{layer['device']}, torch {layer['torch']}, Transformer Engine: "
             f"{'yes' if layer['transformer_engine'] else 'no'}, BF16 8192^3 matmul "
             f"{layer['matmul_peak_tflops']:.0f} TFLOP/s", ""]
    shapes = list(layer["shapes"].items())
    if floor_ms is not None and len(floor_ms) != len(shapes):
        raise SystemExit(f"--floor-ms gives {len(floor_ms)} values for {len(shapes)} shapes")
    for i, (shape, rows) in enumerate(shapes):
        floor = floor_ms[i] if floor_ms else rows["floor"]["ms"]
        lines += layer_table(shape, rows, floor) + [""] + router_table(rows) + [""]
    if step is not None:
        lines += step_table(step) + [""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layer_json", help="benchmarks/moe_layer.py --json output")
    ap.add_argument("--step", help="benchmarks/ep_step_time.py's ep_step_time.json")
    ap.add_argument("--floor-ms", help="comma-separated floor per shape (default: the run's floor row)")
    args = ap.parse_args(argv)
    with open(args.layer_json) as f:
        layer = json.load(f)
    step = None
    if args.step:
        with open(args.step) as f:
            step = json.load(f)
    floor = [float(x) for x in args.floor_ms.split(",")] if args.floor_ms else None
    print(report(layer, floor, step))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
