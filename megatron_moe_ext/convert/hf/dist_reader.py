"""Read a Megatron `torch_dist` checkpoint one tensor slice at a time, on one CPU process.

Why one reader serves every TP/PP/EP layout: Megatron's distributed checkpointing saves each
parameter as a slice of one *global* tensor (a ShardedTensor with global shape and offsets), so
the files hold `decoder.layers.mlp.experts.experts.linear_fc1.weight` as [layers, experts, 2F, H]
whatever TP, PP and EP wrote it; the layout only decides how that tensor is cut into chunks. We
read the chunks that overlap the slice we want (one layer) and paste them together, so host
memory stays near one layer, not the whole model.

The chunks are plain `torch.save` payloads inside the `__R_K.distcp` files (torch's
FileSystemWriter, default serialization); they are loaded with `weights_only=True`. Megatron's
non-tensor state (its argparse namespace `args`, iteration, ...) is the `common_state` object.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_moe_ext.errors import UserError


class CheckpointError(UserError):
    """The Megatron checkpoint cannot be read as asked; nothing was written."""


def resolve_iteration_dir(load: Path, iteration: Optional[int]) -> Tuple[Path, str]:
    """(iteration folder, iteration label) of a checkpoint root or an iter_*/release folder."""
    load = Path(load)
    if not load.is_dir():
        raise CheckpointError(f"--load {load} does not exist or is not a folder.")
    if re.fullmatch(r"iter_\d+|release", load.name) and (load / ".metadata").exists():
        if iteration is not None and load.name != f"iter_{iteration:07d}":
            raise CheckpointError(f"--iteration {iteration} does not match the folder {load}.")
        return load, load.name
    if iteration is not None:
        d = load / f"iter_{iteration:07d}"
        if not d.is_dir():
            have = sorted(p.name for p in load.glob("iter_*")) or ["none"]
            raise CheckpointError(
                f"--iteration {iteration}: {d} does not exist (iterations there: {', '.join(have)})."
            )
        return d, d.name
    tracker = load / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        raise CheckpointError(
            f"--load {load} is not a Megatron checkpoint folder (no "
            "latest_checkpointed_iteration.txt, iter_* or release folder)."
        )
    text = tracker.read_text().strip()
    d = load / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not d.is_dir():
        raise CheckpointError(f"{tracker} names iteration {text}, but {d} does not exist.")
    return d, d.name


class MegatronCheckpoint:
    """One iteration folder of a torch_dist checkpoint, read lazily.

    `shape(key)` is the global shape; `read(key, layer=None)` returns the whole global tensor, or
    with `layer=l` the slice [l] along axis 0 (layer-stacked keys: `decoder.layers.*`)."""

    def __init__(self, iter_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(iter_dir)
        meta_json = self.dir / "metadata.json"
        if not meta_json.exists() or json.loads(meta_json.read_text()).get("sharded_backend") != "torch_dist":
            raise CheckpointError(
                f"{self.dir} is not a torch_dist checkpoint (metadata.json); save "
                "with --ckpt-format torch_dist."
            )
        try:
            self._meta = FileSystemReader(str(self.dir)).read_metadata()
        except Exception as e:  # truncated or foreign .metadata
            raise CheckpointError(f"{self.dir}/.metadata cannot be read ({type(e).__name__}).") from e
        self._tensors = {
            k: v for k, v in self._meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        for info in self._meta.storage_data.values():
            f = self.dir / info.relative_path
            if not f.exists() or f.stat().st_size < info.offset + info.length:
                raise CheckpointError(f"{f} is missing or truncated; the checkpoint is incomplete.")
            if info.transform_descriptors:
                raise CheckpointError(
                    f"{f} uses storage transforms {info.transform_descriptors}, "
                    "which this reader does not support."
                )

    def keys(self):
        return [k for k in self._tensors if not k.startswith("optimizer.")]

    def has(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The global tensor `key` ([*shape]), or its slice [layer] ([*shape[1:]])."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self._tensors[key]
        lo, hi = (0, md.size[0]) if layer is None else (layer, layer + 1)
        out = torch.empty((hi - lo, *md.size[1:]), dtype=md.properties.dtype)
        filled = 0
        for chunk in md.chunks:
            c_lo = chunk.offsets[0] if len(chunk.offsets) else 0
            c_hi = c_lo + (chunk.sizes[0] if len(chunk.sizes) else 1)
            if len(md.size) and (c_hi <= lo or c_lo >= hi):
                continue
            t = self._load_chunk(MetadataIndex(key, chunk.offsets))
            if not len(md.size):
                return t
            a, b = max(lo, c_lo), min(hi, c_hi)
            dst = [slice(a - lo, b - lo)] + [
                slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:])
            ]
            out[tuple(dst)] = t[a - c_lo : b - c_lo]
            filled += (b - a) * t[0].numel()
        if filled != out.numel():
            raise CheckpointError(
                f"{self.dir}: {key} (layer {layer}) is only partly stored "
                f"({filled} of {out.numel()} elements)."
            )
        return out if layer is None else out[0]

    def _load_chunk(self, index) -> torch.Tensor:
        info = self._meta.storage_data[index]
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return torch.load(io.BytesIO(f.read(info.length)), weights_only=True)

    def common_state(self) -> Dict[str, Any]:
        """Megatron's non-tensor state: {'args': Namespace, 'iteration': N, ...}.

        It is a pickle written by Megatron itself (its argparse namespace holds enums and dtypes),
        so it is loaded with weights_only=False: export only reads checkpoints the user trained."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        for index, info in self._meta.storage_data.items():
            if index.fqn.startswith("common_state") and isinstance(
                self._meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata
            ):
                with open(self.dir / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    obj = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
                return obj[0] if isinstance(obj, list) else obj
        common = self.dir / "common.pt"  # older Megatron versions
        if common.exists():
            return torch.load(common, weights_only=False)
        return {}

    def args(self):
        """The argparse namespace the run was started with; refused when absent."""
        args = self.common_state().get("args")
        if args is None:
            raise CheckpointError(
                f"{self.dir} holds no saved Megatron args (common_state/common.pt), "
                "so the model's hyperparameters are unknown; export needs a "
                "checkpoint saved by Megatron's training loop."
            )
        return args
