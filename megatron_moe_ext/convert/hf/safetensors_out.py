"""Write HF weights as safetensors shards while they are produced, with the Hub's index file.

A safetensors file needs its whole header before the data, so a shard is written when it is
full: host memory holds at most one shard (`max_shard_bytes`) plus the tensors being added.
One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` (names are only known once the count is, so shards are renamed
at the end).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch


class ShardedSafetensorsWriter:
    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out = Path(out_dir)
        self.max = int(max_shard_bytes)
        self._buf: Dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._files: List[List[str]] = []    # names per written shard
        self.total_bytes = 0
        self.num_params = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + n > self.max:
            self._flush()
        t = t.detach().contiguous()
        # a view keeps its whole base alive and safetensors refuses tensors sharing storage: copy
        if t.untyped_storage().nbytes() != n:
            t = t.clone()
        self._buf[name] = t
        self._buf_bytes += n
        self.total_bytes += n
        self.num_params += t.numel()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        i = len(self._files)
        save_file(self._buf, str(self.out / f"shard-{i:05d}.tmp"), metadata={"format": "pt"})
        self._files.append(list(self._buf))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> List[str]:
        """Write the last shard and the index; returns the shard file names."""
        if self._buf or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.out / f"shard-{i:05d}.tmp").rename(self.out / name)
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self._files) for k in keys}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
        return names
