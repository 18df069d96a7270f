"""How much of the all-to-all time a PyTorch profiler trace shows hidden behind compute.

Reads the Chrome trace that `torch.profiler` (Megatron's `--profile --use-pytorch-profiler`)
exports and looks at GPU kernels only. The all-to-all kernels are NCCL's send/receive kernels
(`torch.distributed.all_to_all_single` runs as grouped ncclSend/ncclRecv); "hidden" is the part of
their time during which some non-NCCL kernel ran on the same GPU. An NCCL kernel's duration
includes the time it waits for its peer, so the all-to-all time here is an upper bound on the
transfer time, and the hidden fraction counts waiting that overlapped compute as hidden too.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from typing import Iterable, List, Sequence, Tuple

Interval = Tuple[float, float]

A2A_MARKERS = ("SendRecv", "AllToAll", "Alltoall")


def is_nccl(name: str) -> bool:
    return "nccl" in name.split("(")[0].lower()


def is_all_to_all(name: str) -> bool:
    return is_nccl(name) and any(m in name for m in A2A_MARKERS)


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    """Union of [start, end) intervals as a sorted list of disjoint ones."""
    out: List[Interval] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def covered(interval: Interval, union: Sequence[Interval]) -> float:
    """Length of `interval` covered by `union` (disjoint, sorted)."""
    s, e = interval
    total = 0.0
    for us, ue in union:
        if ue <= s:
            continue
        if us >= e:
            break
        total += min(e, ue) - max(s, us)
    return total


@dataclass
class CommOverlap:
    all_to_all_ms: float      # summed duration of the all-to-all kernels
    hidden_ms: float          # of which some compute kernel ran at the same time
    other_comm_ms: float      # other NCCL kernels (gradient reduce-scatter/all-reduce, all-gathers)
    compute_ms: float         # union of non-NCCL kernel time
    busy_ms: float            # union of all kernel time (GPU busy with anything)
    all_to_all_kernels: int

    @property
    def hidden_fraction(self) -> float:
        return self.hidden_ms / self.all_to_all_ms if self.all_to_all_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden_fraction": self.hidden_fraction}


def comm_overlap(events: Iterable[dict]) -> CommOverlap:
    """Overlap statistics from Chrome-trace events (dicts with cat, name, ts, dur in microseconds)."""
    a2a: List[Interval] = []
    other_comm = 0.0
    compute: List[Interval] = []
    everything: List[Interval] = []
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") != "kernel":
            continue
        s = float(ev["ts"])
        iv = (s, s + float(ev.get("dur", 0.0)))
        name = ev.get("name", "")
        everything.append(iv)
        if is_all_to_all(name):
            a2a.append(iv)
        elif is_nccl(name):
            other_comm += iv[1] - iv[0]
        else:
            compute.append(iv)
    union = merge(compute)
    hidden = sum(covered(iv, union) for iv in a2a)
    return CommOverlap(all_to_all_ms=sum(e - s for s, e in a2a) / 1e3, hidden_ms=hidden / 1e3,
                       other_comm_ms=other_comm / 1e3,
                       compute_ms=sum(e - s for s, e in union) / 1e3,
                       busy_ms=sum(e - s for s, e in merge(everything)) / 1e3, all_to_all_kernels=len(a2a))


def load_trace_events(path: str) -> List[dict]:
    """The traceEvents list of a (possibly gzipped) Chrome trace file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data
