"""End-to-end training step time with expert parallelism: stock Megatron against the plugin.

    python benchmarks/ep_step_time.py --nproc 2 --out $OUT [--group a|b|f|all] [--rows NAME,...]

Each row is one `torchrun -m megatron_moe_ext.training.pretrain_gpt` run of the same GPT-MoE on
mock data (EP = --nproc, DP = --nproc, TP = PP = 1, BF16, several micro-batches per step) with
`--log-interval 1`. All rows use the expert backend --experts (default torch) except the
`te experts` rows (stock Megatron's TEGroupedMLP), so that the rows differ in routing, dispatch and
overlap only. Step time is the median of Megatron's per-iteration elapsed times over the
iterations after --warmup and before the profiled ones; the last --profile-steps iterations run under
`torch.profiler` (Megatron's `--profile --use-pytorch-profiler`), and trace_overlap.py reads the
all-to-all kernel time per step and the fraction of it that overlapped compute from every rank's
trace. Rows per token come from the plugin's dispatch metrics (`--moe-ext-run-log`).

Group a (every layer MoE, top-4 of 64): stock alltoall (also with TE's experts); stock with
--overlap-moe-expert-parallel-comm (+ --delay-wgrad-compute with TE experts); C2R + dedup; LocMoE
with ranks per node = half the GPUs. Group f: FP8 (tensorwise) rows. Group b (shared expert +
top-3, the ScMoE comparison): stock; stock with --moe-shared-expert-overlap; stock with the EP
all-to-all overlap; ScMoE pos1; ScMoE pos1 + C2R + dedup. Rows needing Transformer Engine or
CUDA are skipped (and say so) where either is missing; a row that fails is recorded with its log
tail and the rest go on.

Prints a table, writes <out>/ep_step_time.json and <out>/ep_logs.tar.gz (every run's log). The
JSON's commands name the output folder "<out>", so that it holds no machine's paths.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_overlap import comm_overlap, load_trace_events  # noqa: E402

ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+)")


def model_flags(args) -> List[str]:
    if args.tiny:   # CPU smoke size: the same flags, small dimensions
        dims = dict(layers=2, hidden=64, heads=4, seq=64, experts=8, ffn=32, vocab=512)
    elif args.model == "qwen3-like":   # Qwen3-30B-A3B's MoE layer (128 experts of FFN 768, top-8), fewer layers
        dims = dict(layers=args.layers, hidden=2048, heads=32, seq=4096, experts=128, ffn=768, vocab=32000)
    else:
        dims = dict(layers=args.layers, hidden=2048, heads=16, seq=4096, experts=64, ffn=1024, vocab=32000)
    return [
        "--num-layers", str(dims["layers"]), "--hidden-size", str(dims["hidden"]),
        "--num-attention-heads", str(dims["heads"]), "--ffn-hidden-size", str(4 * dims["hidden"]),
        "--seq-length", str(dims["seq"]), "--max-position-embeddings", str(dims["seq"]),
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--num-experts", str(dims["experts"]), "--moe-ffn-hidden-size", str(dims["ffn"]),
        "--moe-token-dispatcher-type", "alltoall", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "1e-3", "--moe-router-dtype", "fp32",
        "--expert-model-parallel-size", str(args.nproc),
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(dims["vocab"]),
        "--micro-batch-size", "1", "--global-batch-size", str(args.nproc * args.microbatches),
        "--lr", "1e-4", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000",
        "--seed", "1234",
    ] + (["--cpu"] if args.cpu else [
        "--bf16", "--moe-grouped-gemm", "--no-gradient-accumulation-fusion"])


TE_FUSIONS = ["--moe-permute-fusion", "--moe-router-fusion"]
A2A_OVERLAP = ["--overlap-moe-expert-parallel-comm"]
C2R_DEDUP = ["--moe-router-policy", "c2r", "--moe-dedup-dispatch"]
FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
TOP4 = ["--moe-router-topk", "TOPK"]   # top-4 (top-8 for --model qwen3-like)
ROUTER_KERNEL = ["--moe-router-kernel", "fused"]
# Megatron's full-iteration CUDA graph (forward and backward of all micro-batches in one graph),
# which needs a step without host reads: the device-splits layer and the fused router
FULL_GRAPH = ["--cuda-graph-impl", "full_iteration", "--no-check-for-nan-in-loss-and-grad"]
TORCH = ["--moe-expert-backend", "torch"]   # group h: the device-splits layer needs the torch experts
SHARED = ["--moe-router-topk", "3", "--moe-shared-expert-intermediate-size", "FFN", "--moe-shared-expert-gate"]

# name -> (group, flags, needs): needs is a subset of {"te", "cuda"}. Every row's experts are
# --experts (default torch, the fastest at this shape, so that the rows differ in routing, dispatch
# and overlap only) except the `te experts` rows, which are stock Megatron's TEGroupedMLP.
ROWS: Dict[str, tuple] = {
    "stock te experts": ("a", TOP4 + TE_FUSIONS + ["--moe-expert-backend", "te"], {"te"}),
    "stock": ("a", TOP4 + TE_FUSIONS, {"te"}),
    "stock +a2a overlap": ("a", TOP4 + TE_FUSIONS + A2A_OVERLAP, {"te", "cuda"}),
    "c2r +dedup": ("a", TOP4 + TE_FUSIONS + C2R_DEDUP, {"te"}),
    "locmoe rpn=half": ("a", TOP4 + TE_FUSIONS + ["--moe-router-policy", "locmoe", "--moe-ranks-per-node",
                                                  "HALF"], {"te"}),
    "stock te experts fp8": ("f", TOP4 + TE_FUSIONS + FP8 + ["--moe-expert-backend", "te"], {"te", "cuda"}),
    "stock fp8": ("f", TOP4 + TE_FUSIONS + FP8, {"te", "cuda"}),
    "c2r +dedup fp8": ("f", TOP4 + TE_FUSIONS + C2R_DEDUP + FP8, {"te", "cuda"}),
    "shared stock": ("b", SHARED + TE_FUSIONS, {"te"}),
    "shared stock +shared overlap": ("b", SHARED + TE_FUSIONS + ["--moe-shared-expert-overlap"], {"te", "cuda"}),
    "shared stock +a2a overlap": ("b", SHARED + TE_FUSIONS + A2A_OVERLAP, {"te", "cuda"}),
    "scmoe pos1": ("b", SHARED + TE_FUSIONS + ["--moe-scmoe", "pos1"], {"te"}),
    "scmoe pos1 +c2r +dedup": ("b", SHARED + TE_FUSIONS + ["--moe-scmoe", "pos1"] + C2R_DEDUP, {"te"}),
    # group h, without TE (one GPU: the host waits): Megatron's router and dispatcher with the
    # torch experts (--moe-ep1-host-splits), stock SequentialMLP, and the plugin's sync-free layer
    "h stock sequential experts": ("h", TOP4 + ["--moe-expert-backend", "sequential"], set()),
    "h stock": ("h", TOP4 + TORCH + ["--moe-ep1-host-splits"], set()),
    "h device-splits": ("h", TOP4 + TORCH, set()),
    "h device-splits +router kernel": ("h", TOP4 + TORCH + ROUTER_KERNEL, {"cuda"}),
    "h c2r +dedup +router kernel": ("h", TOP4 + TORCH + C2R_DEDUP + ROUTER_KERNEL, {"cuda"}),
    "h device-splits +router kernel +full-iteration graph": ("h", TOP4 + TORCH + ROUTER_KERNEL + FULL_GRAPH, {"cuda"}),
    # one GPU with TE's layers (attention, norms; run with --nproc 1): the plugin's EP = 1 layer
    # (torch experts, device splits, fused router; Megatron's permutation, not TE's fused one)
    # beside the `stock te experts` and `stock` rows above
    "device-splits +router kernel": ("a", TOP4 + TORCH + ROUTER_KERNEL, {"te", "cuda"}),
    "device-splits +router kernel +full-iteration graph": ("a", TOP4 + TORCH + ROUTER_KERNEL + FULL_GRAPH,
                                                           {"te", "cuda"}),
    # the same eagerly with TE's fused permutation (the dispatcher keeps its device splits)
    "device-splits +router kernel +permute fusion": ("a", TOP4 + TORCH + ROUTER_KERNEL + TE_FUSIONS[:1],
                                                     {"te", "cuda"}),
    "c2r +dedup +router kernel +permute fusion": ("a", TOP4 + TORCH + C2R_DEDUP + ROUTER_KERNEL + TE_FUSIONS[:1],
                                                  {"te", "cuda"}),
}
BASELINE = {"a": "stock", "b": "shared stock", "f": "stock fp8", "h": "h stock"}


def have(what: str) -> bool:
    if what == "cuda":
        import torch
        return torch.cuda.is_available()
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def row_flags(name: str, args) -> List[str]:
    flags = list(ROWS[name][1])
    if "--moe-expert-backend" not in flags:
        flags = flags + ["--moe-expert-backend", args.experts]
        if args.experts == "te" and "--overlap-moe-expert-parallel-comm" in flags:
            flags = flags + ["--delay-wgrad-compute"]   # with TE's experts, the strongest setting
    if args.cpu:   # the CPU compatibility layer runs Megatron's local layers, without TE
        flags = [f for f in flags if f not in TE_FUSIONS]
    elif ROWS[name][0] == "h":   # no TE: Megatron's local layers and their fusions off
        from megatron_moe_ext.compat.presets import LOCAL_IMPL_FLAGS

        flags = flags + list(LOCAL_IMPL_FLAGS)
    ffn = "32" if args.tiny else "1024"
    topk = "8" if getattr(args, "model", "default") == "qwen3-like" and not args.tiny else "4"
    return [{"FFN": ffn, "HALF": str(max(1, args.nproc // 2)), "TOPK": topk}.get(f, f) for f in flags]


def run_flags(name: str, args) -> List[str]:
    """The model's flags and the row's; SequentialMLP is Megatron's experts without --moe-grouped-gemm."""
    row = row_flags(name, args)
    model = model_flags(args)
    if "sequential" in row:
        model = [f for f in model if f != "--moe-grouped-gemm"]
    return model + row


def parse_step_times(log: str) -> Dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in ITER_RE.finditer(log)}


def run_row(name: str, args, workdir: str) -> dict:
    rundir = os.path.join(workdir, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"))
    os.makedirs(rundir, exist_ok=True)
    prof_start = args.warmup + args.timed + 2   # the profiler's warm-up step is not timed either
    iters = prof_start + args.profile_steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-port", str(args.port), "-m", "megatron_moe_ext.training.pretrain_gpt",
           *run_flags(name, args), "--train-iters", str(iters),
           "--moe-ext-run-log", os.path.join(rundir, "run.jsonl")]
    if not args.cpu:
        cmd += ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(prof_start),
                "--profile-step-end", str(prof_start + args.profile_steps), "--profile-ranks",
                *[str(r) for r in range(args.nproc)], "--tensorboard-dir", os.path.join(rundir, "tb")]
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS=str(args.max_connections), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=args.row_timeout)
        log, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:   # its stdout can be bytes even with text=True
        log, rc = e.stdout or "", "timeout"
        log = log.decode() if isinstance(log, bytes) else log
    wall = time.time() - t0
    with open(os.path.join(rundir, "log.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + log)
    times = parse_step_times(log)
    timed = [t for it, t in times.items() if args.warmup < it <= args.warmup + args.timed]
    # TE + NCCL sometimes abort at interpreter exit, after the last iteration was logged.
    row = {"row": name, "rc": rc, "completed": "after training is done" in log, "wall_s": round(wall, 1),
           "command": " ".join(cmd[1:]).replace(args.out, "<out>"), "iterations_timed": len(timed), "step_ms": statistics.median(timed) if timed else None,
           "step_ms_min": min(timed) if timed else None}
    if rc != 0 and not row["completed"]:
        # the JSON goes into docs: the checkout's path as <repo>, as the commands name <out>
        row["log_tail"] = log[-3000:].replace(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/", "<repo>/")
    traces = sorted(glob.glob(os.path.join(rundir, "torch_profile", "rank-*.json.gz")))
    if traces:
        per_rank = [comm_overlap(load_trace_events(t)) for t in traces]
        n = args.profile_steps
        row["all_to_all_ms_per_step"] = statistics.mean(r.all_to_all_ms for r in per_rank) / n
        row["hidden_fraction"] = statistics.mean(r.hidden_fraction for r in per_rank)
        row["other_comm_ms_per_step"] = statistics.mean(r.other_comm_ms for r in per_rank) / n
        row["a2a_kernels_per_step"] = statistics.mean(r.all_to_all_kernels for r in per_rank) / n
        row["gpu_busy_ms_per_step"] = statistics.mean(r.busy_ms for r in per_rank) / n
    try:
        last = [json.loads(line) for line in open(os.path.join(rundir, "run.jsonl"))][-1]
        row["metrics"] = {k: v for k, v in last.items()
                          if k == "lm loss" or (k.startswith("moe_ext/") and "/layer_" not in k)}
    except (OSError, IndexError, ValueError):
        pass
    return row


def table(rows: List[dict]) -> str:
    base = {}
    out = ["| row | step ms | vs stock | a2a ms/step | hidden | GPU busy ms/step | rc |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        group = ROWS[r["row"]][0]
        if r["row"] == BASELINE[group] and r.get("step_ms"):
            base[group] = r["step_ms"]
        sp = (f"{base[group] / r['step_ms']:.3f}x" if r.get("step_ms") and group in base else "")
        a2a = f"{r['all_to_all_ms_per_step']:.2f}" if "all_to_all_ms_per_step" in r else ""
        hid = f"{100 * r['hidden_fraction']:.0f}%" if "hidden_fraction" in r else ""
        ms = f"{r['step_ms']:.1f}" if r.get("step_ms") else "-"
        busy = f"{r['gpu_busy_ms_per_step']:.0f}" if "gpu_busy_ms_per_step" in r else ""
        rc = "ok" if r.get("completed") else r["rc"]
        out.append(f"| {r['row']} | {ms} | {sp} | {a2a} | {hid} | {busy} | {rc} |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default="runs/ep_step_time")
    ap.add_argument("--group", choices=("a", "b", "f", "h", "all"), default="all",
                    help="a: every-layer MoE top-4; b: shared expert + top-3 (ScMoE); f: FP8; "
                         "h: one GPU without TE, host waits (stock vs the device-splits layer)")
    ap.add_argument("--experts", choices=("torch", "te"), default="torch",
                    help="expert backend of every row not named `te experts`")
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: the group's)")
    ap.add_argument("--model", choices=("default", "qwen3-like"), default="default",
                    help="default: 64 experts (FFN 1024) top-4; qwen3-like: 128 experts (FFN 768) top-8, "
                         "32 heads (use --layers 4 on one GPU: 8 layers of it do not fit with Adam)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=4, help="micro-batches per DP rank per step")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timed", type=int, default=12)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--max-connections", type=int, default=32,
                    help="CUDA_DEVICE_MAX_CONNECTIONS for every row (TP = 1, so Megatron's "
                         "1-connection rule does not apply; the overlap rows want more)")
    ap.add_argument("--row-timeout", type=int, default=240)
    ap.add_argument("--port", type=int, default=29511)
    ap.add_argument("--cpu", action="store_true", help="gloo ranks and the CPU compatibility layer")
    ap.add_argument("--tiny", action="store_true", help="small dimensions (smoke test)")
    args = ap.parse_args(argv)

    names = args.rows.split(",") if args.rows else [n for n, (g, _, _) in ROWS.items()
                                                    if args.group in ("all", g)]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    os.makedirs(args.out, exist_ok=True)
    workdir = os.path.join(args.out, "runs")
    rows = []
    for name in names:
        needs = ROWS[name][2]
        # On CPU the rows run on Megatron's local layers; only the CUDA-only features are skipped.
        if args.cpu:
            missing = (["cuda"] if "cuda" in needs else []) + (["te"] if "te experts" in name else [])
        else:
            missing = [w for w in sorted(needs) if not have(w)]
        if ROWS[name][0] == "h" and args.nproc != 1:   # what group h compares exists on one EP rank only
            missing.append("--nproc 1")
        if missing:
            rows.append({"row": name, "rc": f"skipped (needs {', '.join(missing)})"})
            print(f"[ep_step_time] {name}: skipped, needs {', '.join(missing)}", flush=True)
        else:
            print(f"[ep_step_time] {name} ...", flush=True)
            rows.append(run_row(name, args, workdir))
            r = rows[-1]
            print(f"[ep_step_time] {name}: rc={r['rc']} step={r.get('step_ms')} ms wall={r['wall_s']} s",
                  flush=True)
        with open(os.path.join(args.out, "ep_step_time.json"), "w") as f:
            json.dump({"settings": {**vars(args), "out": "<out>"}, "rows": rows}, f, indent=1)
    with tarfile.open(os.path.join(args.out, "ep_logs.tar.gz"), "w:gz") as tar:
        for p in sorted(glob.glob(os.path.join(workdir, "*", "log.txt"))):
            tar.add(p, arcname=os.path.relpath(p, workdir))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
