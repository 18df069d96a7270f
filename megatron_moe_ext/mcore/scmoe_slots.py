"""Where an ScMoE layer puts its expert GEMMs: a fixed slot, or "auto" (time them, keep the best).

The paper's cost model (Eq. 11) picks the slot K minimising |sum_{i<K} COMP_i - T_dispatch| +
|sum_{i>K} COMP_i - T_combine| from measured operator times; it does not say how it measures.
Here "auto" measures the thing the model predicts, the layer pair's wall time on the main stream
(CUDA events from the routed path's start to the final add), for each candidate slot in turn
over the first training forwards, then freezes the slot with the lowest median. Every rank of
the pipeline stage must order its collectives the same way, so all ranks follow the same
deterministic trial order and agree on the result through one all-reduce (MAX of the medians).
Without CUDA there is nothing to time and "auto" is the default slot.
"""

from __future__ import annotations

import logging
import statistics
from typing import Dict, List, Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 3
TIMED_CALLS_PER_SLOT = 5


class SlotChooser:
    """setting: "auto" or a slot number; slots: the candidates; default: the slot used while
    warming up and without CUDA; group: the ranks that must agree on the slot (the pipeline
    stage's, which contains the EP ranks), None for one process."""

    def __init__(self, setting: Union[str, int], slots: Sequence[int], default: int, name: str = "",
                 group=None) -> None:
        self.group = group
        if setting != "auto":
            # Pos-1 has no block l MLP to overlap: there slot 1 is the same point as slot 2.
            setting = max(int(setting), min(slots))
        self.setting, self.slots, self.default, self.name = setting, tuple(slots), default, name
        self.frozen: Optional[int] = None if setting == "auto" else setting
        self.medians_ms: Dict[int, float] = {}
        self._calls = 0
        self._current: Optional[int] = None
        self._events: Dict[int, List] = {s: [] for s in self.slots}
        self._pending_start = None

    def slot(self, training: bool) -> int:
        """The slot for this forward (advances the trial schedule on training forwards)."""
        self._current = None
        if self.frozen is not None:
            return self.frozen
        if not training or not torch.cuda.is_available():
            return self.default
        i = self._calls
        self._calls += 1
        n_trial = TIMED_CALLS_PER_SLOT * len(self.slots)
        if i < WARMUP_CALLS:
            return self.default
        if i < WARMUP_CALLS + n_trial:
            self._current = self.slots[(i - WARMUP_CALLS) % len(self.slots)]
            return self._current
        self._freeze()
        return self.frozen

    def begin(self, like: torch.Tensor) -> None:
        if self._current is not None and like.is_cuda:
            self._pending_start = torch.cuda.Event(enable_timing=True)
            self._pending_start.record()

    def end(self, like: torch.Tensor) -> None:
        if self._current is not None and self._pending_start is not None and like.is_cuda:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._events[self._current].append((self._pending_start, stop))
        self._pending_start = None

    def _freeze(self) -> None:
        medians = []
        for s in self.slots:
            times = []
            for start, stop in self._events[s]:
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            medians.append(statistics.median(times) if times else float("inf"))
        agreed = torch.tensor(medians, dtype=torch.float64, device="cuda")
        group = self.group if torch.distributed.is_initialized() else None
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=group)
        agreed = agreed.tolist()
        self.medians_ms = dict(zip(self.slots, agreed))
        self.frozen = self.slots[min(range(len(agreed)), key=agreed.__getitem__)]
        self._events = {s: [] for s in self.slots}
        log.info("ScMoE %s: expert slot %d chosen; median pair time per slot (ms): %s", self.name,
                 self.frozen, ", ".join(f"{s}: {t:.3f}" for s, t in self.medians_ms.items()))
