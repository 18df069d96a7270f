"""The results study (issue 17): model quality and routing traffic per policy, on real text.

    python benchmarks/quality_study.py --data data/study/prepared --out $OUT             # every row, seed 1234
    python benchmarks/quality_study.py --data DIR --out $OUT --rows topk,c2r-warmup-t1 --seeds 1234,1235
    python benchmarks/quality_study.py --cpu --tiny --out runs/qs [--data DIR]           # CPU smoke run

Every row trains the same GPT-MoE (8 layers, hidden 512, 16 experts of FFN 512, top-2, sequence
1024: 91M parameters, 54M active; 43M with 32k vocab outside the embeddings) with the same seed
and data order (Megatron's sampler is seeded by --seed and walks the same indexed dataset) for a
fixed token budget, once per (row, seed), on ONE GPU: EP = 1, the local transformer
implementation, the plugin's torch experts, BF16 (no Transformer Engine needed). What EP 8 would
send is computed offline: every run saves a routing trace of its last iteration
(`--save-routing-trace`), and `megatron-moe-ext comm-volume` re-routes those logits with the row's
policy at EP 8 (--ep 8 with an EP-1 trace: tokens in 8 contiguous blocks, one per rank), on one
node (8 ranks per node) and on 2 nodes of 4.

The EP-8 placement is emulated in training where the policy's constraint is a placement rule
that does not depend on where a token comes from: C2R (`--moe-c2r-layout-ep 8`: partners, default
T and plans are EP 8's, 2 experts per rank) and Megatron's group-limited routing
(`--moe-router-num-groups 8`: 8 groups of 2 experts = EP 8's devices). LocMoE's locality loss and
node-local bias depend on the token's source rank, which EP 1 does not have: its rows emulate
EP 8 on 2 nodes of 4 (`--moe-locmoe-layout-ep 8 --moe-ranks-per-node 4`: sample b of each
micro-batch of 8 stands on rank b), and their traces record those sources, so `comm-volume`
counts from where the router thought each token was. Device-limited routing with
group-topk 2 at top-2 is plain top-k (a token's 2 experts are in at most 2 groups): a control that
must match `topk`.

Per run: <out>/runs/<row>_s<seed>/{log.txt, run.jsonl, trace/, comm_volume_*.json} and
<out>/results/<row>_s<seed>.json (validation curve, final validation loss and perplexity, load CV,
dropped tokens, tokens/s, rows per token (total, remote, inter-node) at EP 8 on 1 node and 2x4,
the exact commands). <out>/summary.json and summary.md hold the table printed at the end. The
JSON's commands name the output folder "<out>" and the dataset "<data>".

C2R from a plan (the paper's workflow): the top-k run of the same seed saves a checkpoint at
iteration W (= --warmup-frac of the run); `profile` reads co-activation from it, `plan-placement
--ep 8` plans partners (co-resident only for T = 1), `apply-placement` moves the experts, and the
C2R run resumes from iteration W with the plan, so it sees the same tokens in the same order and
the same total budget. It needs the top-k row of its seed first (added automatically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+)")
LAYOUT_EP = 8          # the EP size whose placement is emulated and whose traffic is counted
TOPOLOGIES = {"ep8_1node": 8, "ep8_2x4": 4}   # name -> EP ranks per node

GPU_DIMS = dict(layers=8, hidden=512, heads=8, experts=16, ffn=512, topk=2, seq=1024, mbs=8, gbs=32,
                eval_iters=10)
TINY_DIMS = dict(layers=2, hidden=64, heads=4, experts=16, ffn=64, topk=2, seq=64, mbs=2, gbs=2,
                 eval_iters=2)

SHARED = ["--moe-shared-expert-intermediate-size", "FFN", "--moe-shared-expert-gate"]
C2R = ["--moe-router-policy", "c2r", "--moe-c2r-layout-ep", str(LAYOUT_EP)]
TOP1 = ["--moe-router-topk", "1", "--moe-router-pre-softmax"]
# LocMoE's locality is per node: its rows emulate EP 8 on 2 nodes of 4 (sample b of a micro-batch
# of 8 on rank b), so the locality loss and the local bias act as they would there
LOCMOE_2X4 = ["--moe-locmoe-layout-ep", str(LAYOUT_EP), "--moe-ranks-per-node", "4"]

# name -> (training flags, offline comm-volume policy + options, kind)
# kind: "moe" (every layer MoE), "dense" (no experts), "plan" (C2R from the top-k checkpoint)
# "W" in flags is replaced by the warm-up iteration count, "FFN" by the expert FFN size.
ROWS: Dict[str, tuple] = {
    "topk": ([], ["--policy", "topk"], "moe"),
    "topk-dedup": (["--moe-dedup-dispatch"], ["--policy", "topk", "--dedup"], "moe"),
    "device-limited-g1": (["--moe-router-num-groups", str(LAYOUT_EP), "--moe-router-group-topk", "1"],
                          ["--policy", "topk", "--router-num-groups", str(LAYOUT_EP),
                           "--router-group-topk", "1", "--dedup"], "moe"),
    "device-limited-g2": (["--moe-router-num-groups", str(LAYOUT_EP), "--moe-router-group-topk", "2"],
                          ["--policy", "topk", "--router-num-groups", str(LAYOUT_EP),
                           "--router-group-topk", "2", "--dedup"], "moe"),
    "c2r-warmup-t1": (C2R + ["--moe-c2r-top-t", "1", "--moe-c2r-warmup-steps", "W", "--moe-dedup-dispatch"],
                      ["--policy", "c2r", "--top-t", "1", "--dedup"], "moe"),
    "c2r-t3": (C2R + ["--moe-c2r-top-t", "3", "--moe-dedup-dispatch"],
               ["--policy", "c2r", "--top-t", "3", "--dedup"], "moe"),
    "c2r-plan-t1": (C2R + ["--moe-dedup-dispatch"], ["--policy", "c2r", "--dedup"], "plan"),
    "c2r-plan-t3": (C2R + ["--moe-dedup-dispatch"], ["--policy", "c2r", "--dedup"], "plan"),
    "locmoe": (["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias", "0.6",
                "--moe-locmoe-local-bias-warmup-steps", "W"] + LOCMOE_2X4,
               ["--policy", "locmoe", "--local-bias", "0.6"], "moe"),
    "locmoe-plus": (["--moe-router-policy", "locmoe-plus", "--moe-expert-capacity-factor", "1.0"] + LOCMOE_2X4,
                    ["--policy", "locmoe-plus"], "moe"),
    "scmoe-pos2": (["--moe-layer-freq", "2", "--moe-scmoe", "pos2"] + TOP1 + SHARED,
                   ["--policy", "topk"], "moe"),
    "dgmoe": (["--moe-scmoe", "dgmoe"] + TOP1, ["--policy", "topk"], "moe"),
    "shared-only": ([], [], "dense"),
    "scmoe-pos2-c2r": (["--moe-layer-freq", "2", "--moe-scmoe", "pos2"] + SHARED + C2R +
                       ["--moe-c2r-top-t", "1", "--moe-dedup-dispatch"],
                       ["--policy", "c2r", "--top-t", "1", "--dedup"], "moe"),
}
PLAN_T = {"c2r-plan-t1": 1, "c2r-plan-t3": 3}
DEFAULT_ROWS = list(ROWS)


def dims(args) -> dict:
    return TINY_DIMS if args.tiny else GPU_DIMS


def iterations(args) -> int:
    d = dims(args)
    return max(8, args.tokens // (d["gbs"] * d["seq"]))


def warmup_iters(args) -> int:
    return max(2, int(iterations(args) * args.warmup_frac))


def base_flags(args, kind: str, seed: int, data: dict) -> List[str]:
    """Model, data and schedule flags shared by every row (the row's flags come after)."""
    d = dims(args)
    n = iterations(args)
    flags = [
        "--num-layers", str(d["layers"]), "--hidden-size", str(d["hidden"]),
        "--num-attention-heads", str(d["heads"]),
        "--seq-length", str(d["seq"]), "--max-position-embeddings", str(d["seq"]),
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--micro-batch-size", str(d["mbs"]), "--global-batch-size", str(d["gbs"]),
        "--train-iters", str(n), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, n // 50)), "--weight-decay", "0.1",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--log-interval", "1" if args.tiny else "10",
        "--eval-interval", str(max(1, n // 8)), "--eval-iters", str(d["eval_iters"]),
        "--seed", str(seed),
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", data["tokenizer"],
        "--train-data-path", data["train"], "--valid-data-path", data["valid"],
        "--test-data-path", data["test"],
    ]
    if kind == "dense":   # the shared expert alone, as wide as the MoE layers' active FFN
        flags += ["--ffn-hidden-size", str(d["ffn"] * d["topk"])]
    else:
        flags += ["--ffn-hidden-size", str(d["ffn"] * d["topk"]),   # dense layers (ScMoE pos2's)
                  "--num-experts", str(d["experts"]), "--moe-router-topk", str(d["topk"]),
                  "--moe-ffn-hidden-size", str(d["ffn"]), "--expert-model-parallel-size", "1",
                  "--moe-token-dispatcher-type", "alltoall", "--moe-router-load-balancing-type", "aux_loss",
                  "--moe-aux-loss-coeff", "1e-2", "--moe-router-dtype", "fp32",
                  "--moe-expert-backend", "torch", "--moe-ranks-per-node", "1"]
    if args.cpu:   # the pretrain entry adds the CPU compatibility flags (no grad clipping there)
        flags += ["--cpu"]
    else:
        from megatron_moe_ext.compat.presets import LOCAL_IMPL_FLAGS
        flags += ["--bf16", "--clip-grad", "1.0", *LOCAL_IMPL_FLAGS]
    return flags


def row_flags(name: str, args) -> List[str]:
    flags = list(ROWS[name][0])
    # Megatron: the last --moe-router-topk wins, so TOP1 rows override the base top-2
    subs = {"W": str(warmup_iters(args)), "FFN": str(dims(args)["ffn"])}
    return [subs.get(f, f) for f in flags]


def _launch(args, module: List[str], log_path: str, timeout: int) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               CUDA_DEVICE_MAX_CONNECTIONS="32")   # TP = 1; ScMoE's side stream wants more than 1
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, *module], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=REPO)
        log, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        log = e.stdout or ""
        log, rc = (log.decode() if isinstance(log, bytes) else log), "timeout"
    with open(log_path, "a") as f:
        f.write("$ " + " ".join(module) + "\n\n" + log + "\n")
    return rc, log, time.time() - t0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, flags: List[str]) -> List[str]:
    port = args.port or _free_port()
    return ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
            "-m", "megatron_moe_ext.training.pretrain_gpt", *flags]


def _cli(*argv: str) -> List[str]:
    return ["-m", "megatron_moe_ext.cli", *argv]


def _clean(cmd: List[str], args, data: dict) -> str:
    s = " ".join(cmd)
    s = s.replace(os.path.abspath(args.out), "<out>").replace(args.out, "<out>")
    return s.replace(os.path.dirname(data["tokenizer"]), "<data>")


def prepare_plan(name: str, seed: int, args, data: dict, rundir: str, topk_dir: str) -> tuple:
    """Profile the top-k run's checkpoint at iteration W, plan EP-8 partners, re-place the experts.
    Returns (extra training flags, commands) or raises RuntimeError with the failing step's log."""
    W = warmup_iters(args)
    ckpt = os.path.join(topk_dir, "ckpt")
    it_dir = os.path.join(ckpt, f"iter_{W:07d}")
    if not os.path.isdir(it_dir):
        raise RuntimeError(f"{it_dir} is missing: the top-k row of seed {seed} saves it (run it first)")
    ckpt_w = os.path.join(rundir, "ckpt_w")       # a checkpoint folder whose latest iteration is W
    os.makedirs(ckpt_w, exist_ok=True)
    if not os.path.exists(os.path.join(ckpt_w, f"iter_{W:07d}")):
        os.symlink(os.path.abspath(it_dir), os.path.join(ckpt_w, f"iter_{W:07d}"))
    with open(os.path.join(ckpt_w, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(W))
    log = os.path.join(rundir, "log.txt")
    model = base_flags(args, "moe", seed, data)
    T = PLAN_T[name]
    prof, plan, placed = (os.path.join(rundir, x) for x in ("profile", "plan.json", "ckpt_placed"))
    for p in (prof, plan, placed):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    steps = [
        _cli("profile", "--nproc", "1", *(["--cpu"] if args.cpu else []), "--output", prof, "--",
             *[f for f in model if f != "--cpu"], "--load", ckpt_w, "--eval-iters", str(dims(args)["eval_iters"])),
        _cli("plan-placement", "--profile", prof, "--ep", str(LAYOUT_EP), "--top-t", str(T),
             *(["--co-resident-only"] if T == 1 else []), "--output", plan),
        _cli("apply-placement", "--load", ckpt_w, "--plan", plan, "--save", placed),
    ]
    cmds = []
    for cmd in steps:
        rc, out, _ = _launch(args, cmd, log, args.row_timeout)
        cmds.append(_clean(cmd, args, data))
        if rc != 0:
            raise RuntimeError(f"{cmd[2]} failed (rc {rc}):\n{out[-3000:]}")
    return ["--load", placed, "--moe-c2r-plan", plan], cmds, plan


def comm_volume(name: str, args, rundir: str, plan: Optional[str]) -> Dict[str, dict]:
    """Rows per token at EP 8 (one node, two nodes of 4) from the run's routing trace."""
    policy = list(ROWS[name][1])
    trace = os.path.join(rundir, "trace")
    if not policy or not os.path.isdir(trace) or not os.listdir(trace):
        return {}
    if plan:
        policy += ["--plan", plan]
    out = {}
    for topo, rpn in TOPOLOGIES.items():
        cmd = _cli("comm-volume", "--trace", trace, "--ep", str(LAYOUT_EP), "--ranks-per-node", str(rpn),
                   *policy, "--json")
        rc, log, _ = _launch(args, cmd, os.path.join(rundir, "comm_volume.log"), 600)
        line = next((ln for ln in reversed(log.splitlines()) if ln.startswith("{")), None)
        if rc == 0 and line:
            v = json.loads(line)
            v.pop("layers", None)
            v["command"] = " ".join(cmd).replace(os.path.abspath(args.out), "<out>")
            out[topo] = v
        else:
            out[topo] = {"error": log[-1500:]}
    return out


def parse_run(run_log: str, log: str, args) -> dict:
    rows = [json.loads(x) for x in open(run_log)] if os.path.exists(run_log) else []
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    d = dims(args)
    times = [float(m.group(2)) for m in ITER_RE.finditer(log)]
    steady = times[len(times) // 5:] if len(times) > 4 else times
    step_ms = statistics.median(steady) if steady else None
    tail = train[-max(1, len(train) // 10):]

    def mean(key_part: str) -> Optional[float]:
        vals = [v for r in tail for k, v in r.items()
                if k.startswith("moe_ext/") and "/layer_" not in k and k.endswith(key_part)
                and isinstance(v, (int, float)) and math.isfinite(v)]
        return sum(vals) / len(vals) if vals else None

    final = valid[-1]["lm loss"] if valid else None
    return {
        "iterations": train[-1]["iteration"] if train else 0,
        "train_loss_last": train[-1]["lm loss"] if train else None,
        "valid_curve": [[r["iteration"], r["lm loss"]] for r in valid],
        "valid_loss": final,
        "valid_ppl": math.exp(final) if final is not None and final < 50 else None,
        "load_cv": mean("load_cv"),
        "dropped_token_fraction": mean("dropped_token_fraction"),
        "step_ms": step_ms,
        "tokens_per_s": d["gbs"] * d["seq"] / (step_ms / 1000) if step_ms else None,
    }


def run_one(name: str, seed: int, args, data: dict) -> dict:
    tag = f"{name}_s{seed}"
    rundir = os.path.join(args.out, "runs", tag)
    if os.path.isdir(rundir):
        shutil.rmtree(rundir)
    os.makedirs(rundir)
    kind = ROWS[name][2]
    result = {"row": name, "seed": seed, "tokens_budget": iterations(args) * dims(args)["gbs"] * dims(args)["seq"],
              "commands": []}
    extra, plan = [], None
    try:
        if kind == "plan":
            extra, cmds, plan = prepare_plan(name, seed, args, data, rundir,
                                             os.path.join(args.out, "runs", f"topk_s{seed}"))
            result["commands"] += cmds
    except RuntimeError as e:
        result.update(rc="plan failed", error=str(e)[-3000:])
        return result
    flags = base_flags(args, "dense" if kind == "dense" else "moe", seed, data) + row_flags(name, args) + extra
    flags += ["--moe-ext-run-log", os.path.join(rundir, "run.jsonl")]
    if kind != "dense":
        flags += ["--save-routing-trace", os.path.join(rundir, "trace"),
                  "--routing-trace-max-tokens", str(args.trace_tokens)]
    if name == "topk":   # the plan rows start from its checkpoint at iteration W
        flags += ["--save", os.path.join(rundir, "ckpt"), "--save-interval", str(warmup_iters(args))]
    cmd = _torchrun(args, flags)
    rc, log, wall = _launch(args, cmd, os.path.join(rundir, "log.txt"), args.row_timeout)
    result["commands"].append(_clean(cmd, args, data))
    result.update(rc=rc, completed="after training is done" in log, wall_s=round(wall, 1))
    result.update(parse_run(os.path.join(rundir, "run.jsonl"), log, args))
    if kind == "dense" and not result.get("valid_curve"):
        result.update(_valid_from_log(log))
    if rc != 0 and not result["completed"]:
        result["log_tail"] = log[-3000:]
    if name == "topk":   # keep only iteration W's checkpoint (about 1 GB at the GPU size)
        ckpt = os.path.join(rundir, "ckpt")
        keep = f"iter_{warmup_iters(args):07d}"
        for d in (os.listdir(ckpt) if os.path.isdir(ckpt) else []):
            if d.startswith("iter_") and d != keep:
                shutil.rmtree(os.path.join(ckpt, d), ignore_errors=True)
    result["comm_volume"] = comm_volume(name, args, rundir, plan)
    for topo, v in result["comm_volume"].items():
        for key in ("rows_per_token", "remote_rows_per_token", "inter_node_rows_per_token"):
            if key in v:
                result[f"{topo}_{key}"] = v[key]
    return result


def _topk_checkpoint_ready(seed: int, args) -> bool:
    """The top-k run of `seed` has finished saving its iteration-W checkpoint (Megatron writes
    latest_checkpointed_iteration.txt after a save completes)."""
    ckpt = os.path.join(args.out, "runs", f"topk_s{seed}", "ckpt")
    try:
        with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
            latest = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    return latest >= warmup_iters(args) and os.path.isdir(os.path.join(ckpt, f"iter_{warmup_iters(args):07d}"))


def _run_and_save(name: str, seed: int, args, data: dict) -> dict:
    print(f"[quality_study] {name} seed {seed} ...", flush=True)
    t0 = time.time()
    r = run_one(name, seed, args, data)
    r["concurrent_jobs"] = args.jobs
    r["row_wall_s"] = round(time.time() - t0, 1)   # training, plan steps and comm-volume
    with open(os.path.join(args.out, "results", f"{name}_s{seed}.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(f"[quality_study] {name} seed {seed}: rc={r.get('rc')} valid={r.get('valid_loss')} "
          f"tokens/s={r.get('tokens_per_s')} wall={r.get('wall_s')} s", flush=True)
    return r


def run_all(todo: List[tuple], args, data: dict) -> None:
    """Run the (row, seed) pairs, `--jobs` at a time on the one GPU (each run is host-bound: at
    this size the GPU idles most of a step, so runs sharing it finish sooner together than one
    after another; their tokens/s are then not a single run's). A plan row starts once the top-k
    run of its seed has saved its iteration-W checkpoint, in this call or an earlier one."""
    import concurrent.futures as cf

    t_start, longest = time.time(), 0.0
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        running: Dict[tuple, cf.Future] = {}
        waiting = list(todo)
        while waiting or running:
            if args.time_budget and longest and time.time() - t_start + 1.1 * longest > args.time_budget:
                if waiting:   # a row started now would not end inside the call: leave it for the next
                    print(f"[quality_study] --time-budget {args.time_budget} s: not started: "
                          + ", ".join(f"{n} seed {sd}" for n, sd in waiting), flush=True)
                    waiting = []
            for item in list(waiting):
                name, seed = item
                if len(running) >= max(1, args.jobs):
                    break
                if (ROWS[name][2] == "plan" and not _topk_checkpoint_ready(seed, args)
                        and (("topk", seed) in running or ("topk", seed) in waiting)):
                    continue   # (with no top-k run to wait for, the row fails saying why)
                waiting.remove(item)
                running[item] = pool.submit(_run_and_save, name, seed, args, data)
            done, _ = cf.wait(list(running.values()), timeout=5, return_when=cf.FIRST_COMPLETED)
            for item, fut in list(running.items()):
                if fut in done:
                    longest = max(longest, fut.result().get("row_wall_s", 0.0))  # harness errors stop it
                    del running[item]


_VALID_RE = re.compile(r"validation loss at iteration (\d+) .*?lm loss value: ([0-9.E+-]+)")


def _valid_from_log(log: str) -> dict:
    curve = [[int(m.group(1)), float(m.group(2))] for m in _VALID_RE.finditer(log)]
    if not curve:
        return {}
    return {"valid_curve": curve, "valid_loss": curve[-1][1], "valid_ppl": math.exp(curve[-1][1])}


def summary_table(results: List[dict]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    head = ("| row | seed | valid loss | ppl | load CV | dropped | tokens/s | rows/tok EP8 | remote | "
            "inter-node 2x4 | rc |")
    out = [head, "|---" * 11 + "|"]
    for r in results:
        out.append("| " + " | ".join([
            r["row"], str(r["seed"]), f(r.get("valid_loss"), ".4f"), f(r.get("valid_ppl"), ".2f"),
            f(r.get("load_cv"), ".3f"), f(r.get("dropped_token_fraction"), ".4f"),
            f(r.get("tokens_per_s"), ",.0f"), f(r.get("ep8_1node_rows_per_token"), ".3f"),
            f(r.get("ep8_1node_remote_rows_per_token"), ".3f"),
            f(r.get("ep8_2x4_inter_node_rows_per_token"), ".3f"),
            "ok" if r.get("completed") else str(r.get("rc"))]) + " |")
    return "\n".join(out)


def resolve_data(args) -> dict:
    if args.data:
        root = os.path.abspath(args.data)
    else:
        if not args.cpu:
            raise SystemExit("--data DIR (the prepared study corpus, docs/results-corpus.md) is required on GPU")
        from megatron_moe_ext.training.data import prepare_data  # CPU smoke: the shipped corpus
        root = prepare_data(os.path.join(args.out, "data"), verbose=False).output_dir
    names = {"tokenizer": "tokenizer.model", "train": "train_text_document",
             "valid": "valid_text_document", "test": "test_text_document"}
    data = {k: os.path.join(root, v) for k, v in names.items()}
    if not os.path.exists(data["tokenizer"]) or not os.path.exists(data["train"] + ".bin"):
        raise SystemExit(f"--data {root} holds no prepare-data dataset (tokenizer.model, train_text_document.bin)")
    return data


def parse_runs(rows: str, seeds: str) -> List[Tuple[str, int]]:
    """--rows and --seeds -> the (row, seed) runs, seed by seed in --rows order. An entry
    `row@seed` runs that row for that seed only (several seeds' rows in one call); a plan row's
    seed gets its top-k run first (the plan starts from that run's checkpoint)."""
    default_seeds = [int(s) for s in seeds.split(",") if s]
    entries = []
    for entry in (r for r in rows.split(",") if r):
        name, _, seed = entry.partition("@")
        if name not in ROWS:
            raise ValueError(f"unknown row {name!r} in --rows; choose from {list(ROWS)}")
        if seed and not seed.isdigit():
            raise ValueError(f"--rows entry {entry!r}: the seed after @ must be an integer")
        entries.append((name, [int(seed)] if seed else default_seeds))
    runs = []
    for seed in dict.fromkeys(s for _, ss in entries for s in ss):
        mine = [name for name, ss in entries if seed in ss]
        if any(ROWS[n][2] == "plan" for n in mine) and "topk" not in mine:
            mine.insert(0, "topk")
        runs += [(name, seed) for name in dict.fromkeys(mine)]
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated, from {list(ROWS)}; `row@seed` runs a row for that seed only")
    ap.add_argument("--seeds", default="1234", help="comma-separated seeds; every row runs once per seed")
    ap.add_argument("--tokens", type=int, default=None,
                    help="training tokens per run (default 16,777,216 on GPU: 512 iterations of 32x1024; "
                         "CPU tiny: 2,048)")
    ap.add_argument("--out", default="runs/quality_study")
    ap.add_argument("--data", default=None, help="prepare-data output folder (default on CPU: the shipped corpus)")
    ap.add_argument("--warmup-frac", type=float, default=0.25,
                    help="C2R/LocMoE warm-up and the plan rows' checkpoint, as a fraction of the run")
    ap.add_argument("--trace-tokens", type=int, default=16384, help="tokens per layer in the routing trace")
    ap.add_argument("--row-timeout", type=int, default=1800)
    ap.add_argument("--port", type=int, default=0, help="torchrun's master port (0: a free one per run)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time on the one GPU (plan rows wait for their top-k checkpoint)")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds: start no run that would end after this (1.1 x the longest run so far)")
    ap.add_argument("--skip-done", action="store_true",
                    help="skip (row, seed) pairs whose result in --out completed (resume across calls)")
    ap.add_argument("--cpu", action="store_true", help="gloo and the CPU compatibility layer")
    ap.add_argument("--tiny", action="store_true", help="small dimensions (smoke test)")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 2048 * 4 if args.tiny else 16 * 1024 * 1024
    try:
        todo_all = parse_runs(args.rows, args.seeds)
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    data = resolve_data(args)
    todo = []
    for name, seed in todo_all:
        done = os.path.join(args.out, "results", f"{name}_s{seed}.json")
        if args.skip_done and os.path.exists(done) and json.load(open(done)).get("completed"):
            if name != "topk" or os.path.isdir(os.path.join(args.out, "runs", f"topk_s{seed}", "ckpt")):
                print(f"[quality_study] {name} seed {seed}: done before, skipped", flush=True)
                continue
        todo.append((name, seed))
    run_all(todo, args, data)
    # the summary covers every run in --out (earlier invocations' too), in row order, then seed
    order = {n: i for i, n in enumerate(ROWS)}
    results = []
    for fn in os.listdir(os.path.join(args.out, "results")):
        if fn.endswith(".json"):
            with open(os.path.join(args.out, "results", fn)) as f:
                results.append(json.load(f))
    results.sort(key=lambda r: (order.get(r["row"], 99), r["seed"]))
    table = summary_table(results)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"settings": settings, "dims": dims(args), "iterations": iterations(args),
                   "results": results}, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
