"""Write HF weights as safetensors shards while they are produced: host memory holds only the
tensor being written.

A safetensors file starts with a JSON header listing every tensor's name, dtype, shape and byte
range, so the writer is given the plan first, the ordered (name, shape) list, which the exporter
gets by running its mapping on meta tensors. Then it writes the header of each shard up front and
each tensor's bytes as they arrive, in plan order. One shard is `model.safetensors`; more are
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (the Hub's layout).
Format: 8-byte little-endian header length, the header (padded with spaces to 8 bytes), the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def plan_shards(plan: Sequence[Tuple[str, tuple]], dtype: torch.dtype, max_shard_bytes: int) -> List[list]:
    """Cut the ordered (name, shape) plan into shards of at most max_shard_bytes (a tensor
    larger than that gets a shard of its own)."""
    size = torch.empty((), dtype=dtype).element_size()
    shards: List[list] = [[]]
    used = 0
    for name, shape in plan:
        n = size * int(torch.Size(shape).numel())
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, tuple(shape)))
        used += n
    return shards


class StreamingSafetensorsWriter:
    """add(name, tensor) in plan order; close() when done. Shapes and order are checked."""

    def __init__(
        self, out_dir: Path, plan: Sequence[Tuple[str, tuple]], dtype: torch.dtype, max_shard_bytes: int
    ):
        self.out = Path(out_dir)
        self.dtype = dtype
        self.shards = plan_shards(plan, dtype, max_shard_bytes)
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shard, self._pos, self._f = -1, 0, None
        self.total_bytes = 0
        self.num_params = 0

    def _open_next(self) -> None:
        if self._f:
            self._f.close()
        self._shard += 1
        self._pos = 0
        size = torch.empty((), dtype=self.dtype).element_size()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in self.shards[self._shard]:
            n = size * int(torch.Size(shape).numel())
            header[name] = {
                "dtype": _DTYPE[self.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.out / self.names[self._shard], "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._f is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        want, shape = self.shards[self._shard][self._pos]
        if name != want or tuple(t.shape) != shape:
            raise RuntimeError(f"export wrote {name} {list(t.shape)} where the plan has {want} {list(shape)}")
        data = t.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._pos += 1
        self.total_bytes += data.numel()
        self.num_params += t.numel()

    def close(self) -> List[str]:
        """Finish the last shard and write the index (several shards); returns the file names."""
        if self._f:
            self._f.close()
        done = self._shard == len(self.shards) - 1 and self._pos == len(self.shards[-1])
        if not done:
            raise RuntimeError("export ended before every planned tensor was written")
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, shard in enumerate(self.shards) for name, _ in shard}
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2)
            )
        return self.names
