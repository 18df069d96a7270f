"""The trace analysis behind benchmarks/ep_step_time.py's all-to-all columns."""

import gzip
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from trace_overlap import comm_overlap, covered, load_trace_events, merge  # noqa: E402


def kernel(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream}


def test_hand_computed_case():
    events = [
        kernel("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 100, 50, stream=20),
        kernel("sm90_xmma_gemm_bf16", 80, 40),          # covers 100..120
        kernel("elementwise_kernel", 110, 20),          # 110..130, overlaps the gemm
        kernel("ncclDevKernel_SendRecv(x)", 300, 10, stream=20),   # nothing beside it
        kernel("ncclDevKernel_ReduceScatter_Sum_f32(x)", 400, 30, stream=21),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},   # not a kernel
    ]
    r = comm_overlap(events)
    assert r.all_to_all_kernels == 2
    assert r.all_to_all_ms == 60e-3
    assert r.hidden_ms == 30e-3                 # 100..130 of the first
    assert r.hidden_fraction == 0.5
    assert r.other_comm_ms == 30e-3
    assert r.compute_ms == 50e-3                # union 80..130
    assert r.busy_ms == 50e-3 + 20e-3 + 10e-3 + 30e-3   # 80..150, 300..310, 400..430


def test_against_a_per_microsecond_reference():
    rng = random.Random(0)
    for _ in range(20):
        comp = [(float(s), float(s + rng.randint(1, 30))) for s in (rng.randint(0, 200) for _ in range(15))]
        comm = [(float(s), float(s + rng.randint(1, 40))) for s in (rng.randint(0, 200) for _ in range(5))]
        busy = {t for s, e in comp for t in range(int(s), int(e))}
        want = sum(1 for s, e in comm for t in range(int(s), int(e)) if t in busy)
        union = merge(comp)
        assert all(a[1] < b[0] for a, b in zip(union, union[1:]))
        assert sum(covered(iv, union) for iv in comm) == want


def test_loads_gzipped_trace(tmp_path):
    p = tmp_path / "rank-0.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": [kernel("ncclDevKernel_SendRecv", 0, 5)]}, f)
    assert comm_overlap(load_trace_events(str(p))).all_to_all_ms == 5e-3
