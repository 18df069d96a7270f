"""Step time per routing policy from 8 to 1024 GPUs (8 per node): a calibrated projection.

    python benchmarks/scale_model.py [--out scale_model.json] [--gpus 8,16,...] [--rows-from SUMMARY.json]

No GPU is used: every input is a file in the repository or a public figure, each stated below
with its source. The model (per GPU, per training step, weak scaling: the per-GPU batch of the
EP=2 benchmark stays fixed as GPUs are added):

    step(p, N) = compute(p) + kernels(p) * wait(p, EP) + other_nccl(p) + bytes_time(p, N) - hidden(p, N)

- compute(p): the EP=2 step time minus its all-to-all kernel time and its other NCCL time, as
  measured per policy on two H200s (docs/results/ep2_h200x2/*.json, docs/performance.md section 2).
  It holds the host-bound Python time too. The expert GEMMs in it, from the single-GPU MoE layer
  rate (212 TFLOP/s, torch BF16 grouped GEMM, Qwen3-like layer, docs/performance.md section 1),
  are printed beside it; they do not change with EP under weak scaling (the same tokens x k rows
  per GPU), so compute(p) is held constant.
- wait(p, EP): per collective, calibrated at EP=2 as (measured a2a kernel ms - bytes / NVLink) /
  a2a kernels per step (the kernels include the waiting for the peer, docs/performance.md "The
  scale model, corrected"). Two variants: `const` keeps it; `jitter` scales it by the expected
  maximum of EP standard-normal delays over that of 2 (each all-to-all waits for the slowest of
  EP ranks): sqrt(2 ln EP) / (1/sqrt(pi)).
- other_nccl(p): measured at EP=2 (the stock dispatcher's token-count all-gathers; ~0 for dedup).
- bytes_time(p, N): tokens per GPU per step (4 micro-batches x 4096) x rows per token x hidden
  2048 x 2 bytes x 4 all-to-alls per layer (dispatch, combine; forward, backward) x 8 layers,
  split into intra-node rows over NVLink and inter-node rows over InfiniBand, which run at the
  same time: max(intra / NVLINK, inter / IB).
  Rows per token: `comm-volume` at (EP, 8 ranks per node), synthetic router logits (uniform
  experts; --skew to change), 64 experts top-4 (group A) or top-3 plus a shared expert (group B),
  the policy's own offline routing, EP = min(N, 64) (64 experts). With --rows-from, the study's
  measured rows per token at EP 8 (benchmarks/quality_study.py summary.json) replace the synthetic
  ones at EP 8 for the rows it has, as ratios to the study's top-k applied to this model's top-k
  (the study trains 16 experts top-2; what carries over is the share of top-k's rows a policy keeps).
- hidden(p, N): ScMoE runs the routed all-to-all beside attention and the shared expert; it can
  hide the bytes term (not the waits, which are barriers) up to a window = that work's share of
  the layer FLOPs (computed from the shape: 0.62) x compute(p).

Public figures: H200 NVLink 4, 900 GB/s per GPU both directions = 450 GB/s each way (NVIDIA H200
datasheet); InfiniBand NDR 400 Gb/s = 50 GB/s per GPU, one ConnectX-7 per GPU (NVIDIA DGX H200
system); PCIe Gen4 x16 32 GB/s nominal, 25 GB/s used for the ScMoE PCIe comparison (A30/A800 PCIe
servers have no NVLink between all 8 GPUs). DeepSeek-V3 quotes NVLink 160 GB/s and IB 50 GB/s
effective for H800 (anchors-and-users.md), a 3.2x ratio; ours is 9x.

Papers (methods-from-papers.md, anchors-and-users.md): C2R 20-30% total running time saved over
MegaBlocks (C2R's T here: experts per rank - 1, at least k - 1, so one rank per token up to EP 16
at top-4 of 64, then the fewest ranks that hold k experts); ScMoE 1.14x training on 8xA800 NVLink (LLaMA2-MoE), 1.49x on 8xA30 PCIe (SwinV2-MoE);
LocMoE 12.68-22.24% less time per epoch than hash/switch routers on Ascend clusters; DeepSeek-V3
node-limited routing (at most M = 4 nodes per token of 8 routed experts; modelled here as
Megatron's group-limited routing with groups = nodes, M = 2 nodes for top-4, the same k/M).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

NVLINK_GBPS = 450.0     # H200 NVLink 4, per direction per GPU (datasheet: 900 GB/s bidirectional)
IB_GBPS = 50.0          # NDR 400 Gb/s per GPU (DGX H200: one ConnectX-7 per GPU)
PCIE_GBPS = 25.0        # PCIe Gen4 x16, 32 GB/s nominal; used for the ScMoE PCIe comparison
LAYER_RATE_TFLOPS = 212.0   # torch BF16 grouped GEMM, Qwen3-like MoE layer (docs/performance.md §1)
GPUS_PER_NODE = 8

# The EP=2 benchmark's shape (docs/performance.md §2)
SHAPE = dict(layers=8, hidden=2048, seq=4096, microbatches=4, experts=64, ffn=1024, bytes_per_el=2,
             a2a_per_layer=4)
TOKENS_PER_GPU = SHAPE["seq"] * SHAPE["microbatches"]

# policy -> (EP=2 row in docs/results/ep2_h200x2, group, comm-volume args, baseline policy)
POLICIES: Dict[str, tuple] = {
    "topk": ("stock", "a", ["--policy", "topk"], "topk"),
    "topk+dedup": ("c2r +dedup", "a", ["--policy", "topk", "--dedup"], "topk"),
    "c2r+dedup (one rank)": ("c2r +dedup", "a", ["--policy", "c2r", "--top-t", "TT", "--dedup"], "topk"),
    "node-limited M=2": ("stock", "a", ["--policy", "topk", "--router-num-groups", "NODES",
                                        "--router-group-topk", "M2"], "topk"),
    "node-limited M=2 +dedup": ("c2r +dedup", "a", ["--policy", "topk", "--router-num-groups", "NODES",
                                                    "--router-group-topk", "M2", "--dedup"], "topk"),
    "locmoe bias 0.6": ("locmoe rpn=half", "a", ["--policy", "locmoe", "--local-bias", "0.6"], "topk"),
    "shared+top3": ("shared stock", "b", ["--policy", "topk", "--topk", "3"], "shared+top3"),
    "scmoe pos1": ("scmoe pos1", "b", ["--policy", "topk", "--topk", "3"], "shared+top3"),
    "scmoe pos1 +c2r+dedup": ("scmoe pos1 +c2r +dedup", "b", ["--policy", "c2r", "--topk", "3", "--top-t", "TT",
                                                              "--dedup"],
                              "shared+top3"),
}
SCMOE = {"scmoe pos1", "scmoe pos1 +c2r+dedup"}
TOPK = {"a": 4, "b": 3}


def load_ep2_rows() -> Dict[str, dict]:
    rows = {}
    for name in ("ep_step_time_a.json", "ep_step_time_b_f.json"):
        with open(os.path.join(REPO, "docs", "results", "ep2_h200x2", name)) as f:
            for r in json.load(f)["rows"]:
                if r.get("step_ms"):
                    rows[r["row"]] = r
    return rows


def comm_rows(args_: List[str], ep: int, rpn: int, topk: int, skew: float) -> dict:
    key = (tuple(args_), ep, rpn, topk, skew)
    if key not in _CACHE:
        _CACHE[key] = _comm_rows(args_, ep, rpn, topk, skew)
    return _CACHE[key]


_CACHE: Dict[tuple, dict] = {}


def _comm_rows(args_: List[str], ep: int, rpn: int, topk: int, skew: float) -> dict:
    from megatron_moe_ext.cli import main

    argv = ["comm-volume", "--experts", str(SHAPE["experts"]), "--topk", str(topk), "--ep", str(ep),
            "--ranks-per-node", str(rpn), "--tokens", "8192", "--seed", "0", "--skew", str(skew), "--json"]
    nodes = max(1, ep // rpn)
    # C2R's T: one rank's experts (experts per rank - 1), at least k - 1 (past EP 16 at top-4,
    # a rank holds fewer than k experts and a token needs more than one rank)
    subs = {"NODES": str(nodes), "M2": str(min(2, nodes)),
            "TT": str(max(topk - 1, SHAPE["experts"] // ep - 1))}
    argv += [subs.get(a, a) for a in args_]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"comm-volume {' '.join(argv)} failed")
    return json.loads(buf.getvalue())


def bytes_per_step(rows_per_token: float) -> float:
    return (TOKENS_PER_GPU * rows_per_token * SHAPE["hidden"] * SHAPE["bytes_per_el"] *
            SHAPE["a2a_per_layer"] * SHAPE["layers"])


def scmoe_window_share() -> float:
    """Attention + shared expert FLOPs over the block's FLOPs (group B shape), per token."""
    h, s, f = SHAPE["hidden"], SHAPE["seq"], SHAPE["ffn"]
    attn = 4 * h * h + s * h            # projections + causal scores/values (half of 2*s*h)
    shared = 3 * h * f
    routed = TOPK["b"] * 3 * h * f
    return (attn + shared) / (attn + shared + routed)


def expert_gemm_ms(topk: int) -> float:
    flops = 6 * TOKENS_PER_GPU * topk * SHAPE["hidden"] * SHAPE["ffn"] * 3 * SHAPE["layers"]
    return flops / (LAYER_RATE_TFLOPS * 1e12) * 1e3


def jitter_factor(ep: int) -> float:
    return math.sqrt(2 * math.log(ep)) / (1 / math.sqrt(math.pi)) if ep > 1 else 0.0


def calibrate(ep2: Dict[str, dict], skew: float) -> Dict[str, dict]:
    cal = {}
    for pol, (row, group, cv, _) in POLICIES.items():
        r = ep2[row]
        rows2 = comm_rows(cv, 2, 2, TOPK[group], skew)
        b_ms = bytes_per_step(rows2["remote_rows_per_token"]) / (NVLINK_GBPS * 1e9) * 1e3
        kernels = r["a2a_kernels_per_step"]
        cal[pol] = {
            "ep2_row": row, "ep2_step_ms": r["step_ms"], "ep2_a2a_ms": r["all_to_all_ms_per_step"],
            "ep2_other_nccl_ms": r["other_comm_ms_per_step"], "a2a_kernels_per_step": kernels,
            "compute_ms": r["step_ms"] - r["all_to_all_ms_per_step"] - r["other_comm_ms_per_step"],
            "wait_ms_per_kernel": max(0.0, (r["all_to_all_ms_per_step"] - b_ms) / kernels),
            "ep2_bytes_ms": b_ms, "expert_gemm_ms": expert_gemm_ms(TOPK[group]),
        }
    return cal


def project(cal: Dict[str, dict], gpus: List[int], skew: float, measured: Dict[str, dict],
            nvlink: float = NVLINK_GBPS, ib: float = IB_GBPS) -> List[dict]:
    out = []
    window = scmoe_window_share()
    for n in gpus:
        ep = min(n, SHAPE["experts"])
        rpn = min(GPUS_PER_NODE, ep)
        for pol, (row, group, cv, base) in POLICIES.items():
            c = cal[pol]
            v = comm_rows(cv, ep, rpn, TOPK[group], skew)
            src = "synthetic"
            if ep == 8 and pol in measured:   # the study's ratio to its own top-k, on this top-k
                top = comm_rows(POLICIES["topk"][2], ep, rpn, TOPK["a"], skew)
                v = {**v, **{key: top[key] * ratio for key, ratio in measured[pol].items()}}
                src = "study"
            remote, inter = v["remote_rows_per_token"], v["inter_node_rows_per_token"]
            intra_ms = bytes_per_step(remote - inter) / (nvlink * 1e9) * 1e3
            inter_ms = bytes_per_step(inter) / (ib * 1e9) * 1e3
            b_ms = max(intra_ms, inter_ms)
            hidden = min(b_ms, window * c["compute_ms"]) if pol in SCMOE else 0.0
            fixed = c["compute_ms"] + c["ep2_other_nccl_ms"] + b_ms - hidden
            k = c["a2a_kernels_per_step"]
            out.append({
                "gpus": n, "ep": ep, "nodes_per_ep_group": max(1, ep // GPUS_PER_NODE), "policy": pol,
                "baseline": base, "rows_source": src,
                "rows_per_token": v["rows_per_token"], "remote_rows_per_token": remote,
                "inter_node_rows_per_token": inter,
                "inter_node_share": inter / v["rows_per_token"] if v["rows_per_token"] else 0.0,
                "bytes_ms": b_ms, "hidden_ms": hidden,
                "step_ms_const": fixed + k * c["wait_ms_per_kernel"],
                "step_ms_jitter": fixed + k * c["wait_ms_per_kernel"] * jitter_factor(ep) / jitter_factor(2),
            })
    by = {(r["gpus"], r["policy"]): r for r in out}
    for r in out:
        b = by[(r["gpus"], r["baseline"])]
        r["speedup_const"] = b["step_ms_const"] / r["step_ms_const"]
        r["speedup_jitter"] = b["step_ms_jitter"] / r["step_ms_jitter"]
    return out


def paper_checks(cal, skew) -> List[dict]:
    """The model's figures at the papers' settings, beside what the papers report."""
    checks = []
    one_node = {r["policy"]: r for r in project(cal, [8], skew, {})}
    pcie = {r["policy"]: r for r in project(cal, [8], skew, {}, nvlink=PCIE_GBPS, ib=PCIE_GBPS)}
    two_node = {r["policy"]: r for r in project(cal, [16], skew, {})}
    big = {r["policy"]: r for r in project(cal, [64], skew, {})}
    checks.append({"claim": "ScMoE 1.14x training, 8xA800 NVLink (LLaMA2-MoE)", "paper": 1.14,
                   "model": one_node["scmoe pos1"]["speedup_const"], "setting": "8 GPUs, NVLink"})
    checks.append({"claim": "ScMoE 1.49x training, 8xA30 PCIe (SwinV2-MoE-S)", "paper": 1.49,
                   "model": pcie["scmoe pos1"]["speedup_const"], "setting": f"8 GPUs, {PCIE_GBPS} GB/s links"})
    checks.append({"claim": "C2R 20-30% running time saved over MegaBlocks", "paper": "1.25-1.43x",
                   "model": {n: r["speedup_const"] for n, r in
                             (("8", one_node["c2r+dedup (one rank)"]), ("16", two_node["c2r+dedup (one rank)"]),
                              ("64", big["c2r+dedup (one rank)"]))},
                   "setting": "8, 16, 64 GPUs against stock top-4 (not MegaBlocks)"})
    checks.append({"claim": "LocMoE 12.68-22.24% less time per epoch (Ascend clusters)", "paper": "1.15-1.29x",
                   "model": {n: r["speedup_const"] for n, r in
                             (("16", two_node["locmoe bias 0.6"]), ("64", big["locmoe bias 0.6"]))},
                   "setting": "16 and 64 GPUs, local bias 0.6 on synthetic logits"})
    checks.append({"claim": "DeepSeek-V3 node-limited routing (at most 4 nodes of 8 experts)",
                   "paper": "bounds inter-node traffic; no speed-up reported",
                   "model": {"inter_node_rows_64gpus": big["node-limited M=2"]["inter_node_rows_per_token"],
                             "topk_inter_node_rows_64gpus": big["topk"]["inter_node_rows_per_token"],
                             "speedup_64gpus": big["node-limited M=2"]["speedup_const"],
                             "dedup_inter_node_rows_64gpus": big["node-limited M=2 +dedup"]["inter_node_rows_per_token"],
                             "dedup_speedup_64gpus": big["node-limited M=2 +dedup"]["speedup_const"]},
                   "setting": "64 GPUs (8 nodes), M = 2 nodes for top-4"})
    return checks


def table(rows: List[dict]) -> str:
    out = ["| GPUs | EP | policy | rows/tok | inter-node rows | inter share | bytes ms | hidden ms | "
           "step ms (const wait) | speed-up | step ms (jitter) | speed-up |", "|---" * 12 + "|"]
    for r in rows:
        out.append(f"| {r['gpus']} | {r['ep']} | {r['policy']} | {r['rows_per_token']:.3f} | "
                   f"{r['inter_node_rows_per_token']:.3f} | {r['inter_node_share']:.2f} | {r['bytes_ms']:.1f} | "
                   f"{r['hidden_ms']:.1f} | {r['step_ms_const']:.0f} | {r['speedup_const']:.3f}x | "
                   f"{r['step_ms_jitter']:.0f} | {r['speedup_jitter']:.3f}x |")
    return "\n".join(out)


def measured_rows(path: Optional[str]) -> Dict[str, dict]:
    """Rows per token at EP 8 on one node relative to top-k's, measured by the results study, for
    the policies it has: {policy: {key: ratio}}. Ratios, because the study's model (16 experts,
    top-2) is not this projection's (64 experts, top-4): what carries over is how much of top-k's
    traffic a policy keeps. `path`: a quality_study summary.json ({"results": [...]}) or a folder
    of its per-run JSON; seeds are averaged."""
    if not path:
        return {}
    if os.path.isdir(path):
        results = []
        for fn in sorted(os.listdir(path)):
            if fn.endswith(".json") and "_s" in fn and not fn.startswith("summary"):
                with open(os.path.join(path, fn)) as f:
                    results.append(json.load(f))
    else:
        with open(path) as f:
            results = json.load(f)["results"]
    mapping = {"topk": "topk", "topk-dedup": "topk+dedup", "c2r-warmup-t1": "c2r+dedup (one rank)",
               "locmoe": "locmoe bias 0.6"}
    keys = ("rows_per_token", "remote_rows_per_token")   # one node: no inter-node rows
    sums: Dict[str, Dict[str, List[float]]] = {}
    for r in results:
        v = r.get("comm_volume", {}).get("ep8_1node")
        if r.get("completed") and r["row"] in mapping and v and all(k in v for k in keys):
            for k in keys:
                sums.setdefault(r["row"], {}).setdefault(k, []).append(v[k])
    if "topk" not in sums:
        return {}
    mean = {row: {k: sum(x) / len(x) for k, x in d.items()} for row, d in sums.items()}
    return {mapping[row]: {k: m[k] / mean["topk"][k] for k in keys} for row, m in mean.items()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="8,16,32,64,128,256,512,1024")
    ap.add_argument("--skew", type=float, default=0.0, help="synthetic logits' per-expert popularity std")
    ap.add_argument("--rows-from", default=None, help="quality_study summary.json or folder of run JSON (measured EP-8 rows)")
    ap.add_argument("--out", default=None, help="JSON to write")
    args = ap.parse_args(argv)
    gpus = [int(g) for g in args.gpus.split(",")]
    cal = calibrate(load_ep2_rows(), args.skew)
    rows = project(cal, gpus, args.skew, measured_rows(args.rows_from))
    checks = paper_checks(cal, args.skew)
    print("calibration at EP=2 (two H200, NVLink):")
    for pol, c in cal.items():
        print(f"  {pol}: compute {c['compute_ms']:.1f} ms (expert GEMMs {c['expert_gemm_ms']:.1f}), "
              f"wait {c['wait_ms_per_kernel']:.3f} ms x {c['a2a_kernels_per_step']:.0f} kernels, "
              f"other NCCL {c['ep2_other_nccl_ms']:.1f} ms")
    print(table(rows))
    print("\npapers vs model:")
    for c in checks:
        print(f"  {c['claim']}: paper {c['paper']}; model {json.dumps(c['model'], default=lambda x: round(x, 3))}"
              f" ({c['setting']})")
    doc = {"constants": {"nvlink_GBps": NVLINK_GBPS, "ib_GBps": IB_GBPS, "pcie_GBps": PCIE_GBPS,
                         "layer_rate_tflops": LAYER_RATE_TFLOPS, "gpus_per_node": GPUS_PER_NODE,
                         "shape": SHAPE, "scmoe_window_share": scmoe_window_share(), "skew": args.skew},
           "calibration": cal, "rows": rows, "paper_checks": checks}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
