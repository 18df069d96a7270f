"""Read a HuggingFace model folder without executing anything from it.

config.json is parsed as JSON (no `trust_remote_code`, no modeling files); weights come from
safetensors (`model.safetensors`, or the shards named by `model.safetensors.index.json`) or, only
when no safetensors exist, from `pytorch_model*.bin` through `torch.load(weights_only=True)`.
Both on-disk expert layouts are accepted: per expert (`experts.E.gate_proj.weight`, Mixtral
`block_sparse_moe.experts.E.w1.weight`) and fused (`experts.gate_up_proj` [E, 2I, H] with gate
rows first, `experts.down_proj` [E, H, I]); fused tensors are presented under per-expert names.
Tensors are read lazily, one at a time (safetensors headers give shapes without reading data).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

from megatron_moe_ext.errors import UserError


class HFFolderError(UserError):
    """The HuggingFace folder cannot be imported; nothing was written."""


def read_config(hf_dir: Path) -> Dict:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFFolderError(f"--hf {hf_dir} does not exist or is not a folder.")
    path = hf_dir / "config.json"
    if not path.exists():
        raise HFFolderError(f"--hf {hf_dir} has no config.json.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFolderError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from e


_FUSED = re.compile(r"^(model\.layers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")


class HFWeights:
    """name -> tensor for an HF folder; `shapes` lists every (per-expert) name with its shape."""

    def __init__(self, hf_dir: Path, arch: str):
        self.dir = Path(hf_dir)
        self.arch = arch
        self._loaders: Dict[str, Callable[[], torch.Tensor]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self._last: Tuple[str, torch.Tensor] = ("", torch.empty(0))
        files = self._weight_files()
        for f in files:
            if f.suffix == ".safetensors":
                self._index_safetensors(f)
            else:
                self._index_bin(f)

    def _weight_files(self):
        d = self.dir
        index = d / "model.safetensors.index.json"
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise HFFolderError(f"{index} is not a valid safetensors index ({e}).") from e
            missing = [n for n in names if not (d / n).exists()]
            if missing:
                raise HFFolderError(f"{index} names {missing[0]}, which is missing from {d}.")
            return [d / n for n in names]
        st = sorted(d.glob("*.safetensors"))
        if st:
            return st
        bins = sorted(d.glob("pytorch_model*.bin"))
        if bins:
            return bins
        raise HFFolderError(f"--hf {d} has no weights (model.safetensors, its index, or pytorch_model.bin).")

    def _index_safetensors(self, f: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(f), framework="pt")
            names = list(handle.keys())
            with f.open("rb") as fh:
                header_end = 8 + int.from_bytes(fh.read(8), "little")
                header = fh.read(header_end - 8)
            need = header_end
            for n in names:
                sl = handle.get_slice(n)
                shape = tuple(sl.get_shape())
                self._add(n, shape, lambda n=n, h=handle: h.get_tensor(n))
            # safetensors checks offsets lazily: a truncated file fails only when read
            meta = json.loads(header)
            end = max([v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"] or [0])
            need += end
        except HFFolderError:
            raise
        except Exception as e:
            raise HFFolderError(f"{f} cannot be read as safetensors ({type(e).__name__}: {e}).") from e
        if f.stat().st_size < need:
            raise HFFolderError(f"{f} is truncated ({f.stat().st_size} bytes, its header needs {need}).")

    def _index_bin(self, f: Path) -> None:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise HFFolderError(
                f"{f} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__})."
            ) from e
        for n, t in sd.items():
            self._add(n, tuple(t.shape), lambda t=t: t)

    def _add(self, name: str, shape, load: Callable[[], torch.Tensor]) -> None:
        if self.arch == "mixtral":  # transformers 5 in-memory names use .mlp. for Mixtral too
            name = re.sub(r"^(model\.layers\.\d+)\.mlp\.(gate|experts)", r"\1.block_sparse_moe.\2", name)
        m = _FUSED.match(name)
        if not m:
            self.shapes[name] = shape
            self._loaders[name] = load
            return
        prefix, block, kind = m.groups()
        load = self._cached(name, load)
        names = ("w1", "w3", "w2") if self.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        E = shape[0]
        for e in range(E):
            if kind == "gate_up_proj":  # [E, 2I, H], gate rows first
                half = shape[1] // 2
                for j, nm in enumerate(names[:2]):
                    self.shapes[f"{prefix}.{block}.experts.{e}.{nm}.weight"] = (half, shape[2])
                    self._loaders[f"{prefix}.{block}.experts.{e}.{nm}.weight"] = lambda e=e, j=j, half=half: (
                        load()[e, j * half : (j + 1) * half].contiguous()
                    )
            else:  # [E, H, I]
                self.shapes[f"{prefix}.{block}.experts.{e}.{names[2]}.weight"] = tuple(shape[1:])
                self._loaders[f"{prefix}.{block}.experts.{e}.{names[2]}.weight"] = lambda e=e: load()[
                    e
                ].contiguous()

    def _cached(self, key: str, load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A fused tensor is read once for all its experts (the last one read is kept)."""

        def cached():
            if self._last[0] != key:
                self._last = (key, load())
            return self._last[1]

        return cached

    def get(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def check(self, expected: Dict[str, tuple], config_path: str) -> None:
        """Every expected tensor present with its shape (config.json vs weights)."""
        for name, shape in expected.items():
            if name not in self.shapes:
                raise HFFolderError(f"{self.dir} has no tensor {name}, which {config_path} implies.")
            if tuple(self.shapes[name]) != tuple(shape):
                raise HFFolderError(
                    f"{self.dir}: {name} has shape {list(self.shapes[name])} but "
                    f"{config_path} implies {list(shape)}."
                )
        extra = [
            n
            for n in self.shapes
            if n not in expected and not n.endswith("rotary_emb.inv_freq") and not (n == "lm_head.weight")
        ]
        if extra:
            raise HFFolderError(f"{self.dir} has tensors {config_path} does not describe, e.g. {extra[0]}.")
