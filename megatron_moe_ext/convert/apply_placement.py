"""`megatron-moe-ext apply-placement`: move experts of a Megatron checkpoint to their planned slots.

Works on Megatron's `torch_dist` checkpoints (the default distributed format), on one CPU process:
it reads every tensor of the iteration folder, and for each MoE layer of the plan moves expert e
to slot `expert_to_slot[e]` along the expert axis of the expert weights, the router weight rows,
the expert bias, their optimizer moments and fp32 copies, and renames the per-expert
`_extra_state` shards. The model computes the same function afterwards (tests compare losses).
The input is only read; the output folder must be new. Everything is checked before writing.

Memory: the whole checkpoint is held in CPU memory, which is fine for the models this plugin's
CPU tests and small GPU runs use; for very large checkpoints run it on a large-memory host.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch.distributed.checkpoint import DefaultSavePlanner

from megatron_moe_ext.errors import UserError
from megatron_moe_ext.files.plan import Plan, load_plan, write_placement_marker

# keys whose axis 1 is the expert axis (axis 0 = layer); optimizer states carry them as suffixes
_EXPERT_AXIS_KEYS = re.compile(
    r"(^|\.)decoder\.layers\.mlp\.(experts\.experts\.linear_fc[12]\.(weight|bias)|"
    r"router\.(weight|expert_bias))$")
_EXTRA_STATE = re.compile(r"^(.*decoder\.layers\.mlp\.experts\.experts\.linear_fc[12]\._extra_state"
                          r"/shard_)(\d+)\.(\d+)_(\d+)\.(\d+)$")


class PlacementError(UserError):
    """The checkpoint, plan or output cannot be used; nothing was written."""


def _iteration_dir(load: Path) -> Tuple[Path, str]:
    if (load / "latest_checkpointed_iteration.txt").exists():
        it = (load / "latest_checkpointed_iteration.txt").read_text().strip()
        if it == "release":  # what import-hf writes (Megatron's name for a converted checkpoint)
            return load / "release", it
        if not it.isdigit():
            raise PlacementError(f"--load {load}: latest_checkpointed_iteration.txt holds {it!r}, "
                                 "neither an iteration nor 'release'.")
        return load / f"iter_{int(it):07d}", it
    m = re.fullmatch(r"iter_(\d+)", load.name)
    if m and (load / ".metadata").exists():
        return load, str(int(m.group(1)))
    raise PlacementError(f"--load {load} is neither a Megatron checkpoint folder nor an iter_* folder.")


def apply_placement(load: str, plan_path: str, save: str, *, drop_optimizer: bool = False) -> Path:
    """Write `save` = `load` with experts re-placed by the plan. Returns the new iteration folder."""
    given = Path(load).resolve()
    src, iteration = _iteration_dir(given)
    dst_root = Path(save).resolve()
    _check_output(dst_root, given)
    if not (src / "metadata.json").exists() or \
            json.loads((src / "metadata.json").read_text()).get("sharded_backend") != "torch_dist":
        raise PlacementError(f"{src} is not a torch_dist checkpoint (metadata.json); save with "
                             "--ckpt-format torch_dist.")
    plan = load_plan(plan_path)
    state = _read_checkpoint(src, plan, plan_path)
    moved = _permute(state, plan, drop_optimizer)
    try:
        _write_checkpoint(state, src, dst_root, iteration)
    except BaseException:
        shutil.rmtree(dst_root, ignore_errors=True)  # no half-written checkpoint left behind
        raise
    write_placement_marker(dst_root, plan_path, source=str(src), moved_tensors=moved,
                           optimizer_dropped=drop_optimizer)
    return dst_root / src.name


def _check_output(dst_root: Path, ckpt_root: Path) -> None:
    """A new folder outside the input (writing into --load would modify the input checkpoint)."""
    if dst_root.exists():
        raise PlacementError(f"--save {dst_root} exists; give a new folder (the input is never overwritten).")
    if dst_root.is_relative_to(ckpt_root):
        raise PlacementError(f"--save {dst_root} is inside the input checkpoint {ckpt_root}; give a "
                             "folder outside it (the input is never modified).")


def _read_checkpoint(src: Path, plan: Plan, plan_path: str) -> Dict:
    """Every tensor and raw object of the iteration folder, checked against the plan. A damaged
    folder (truncated or missing shard, unreadable metadata) is named, not traced back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = FileSystemReader(str(src))
        meta = reader.read_metadata()
        state = {k: torch.empty(v.size, dtype=v.properties.dtype)
                 for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        _check(plan, state, plan_path, src)
        dcp.load(state, storage_reader=reader, no_dist=True)
        # Megatron's sharded objects (args, RNG, rerun state) are copied as the raw bytes they
        # were stored as: deserializing them through DCP would change their layout.
        state.update(_raw_objects(src, meta))
    except PlacementError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise PlacementError(f"--load {src} cannot be read ({_first_line(e)}); the checkpoint is "
                             "damaged or incomplete (a truncated or missing shard), nothing was written.") from None
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _write_checkpoint(state: Dict, src: Path, dst_root: Path, iteration: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from megatron_moe_ext.files.routing_marker import MARKER as ROUTING_MARKER

    dst = dst_root / src.name
    dst.mkdir(parents=True)
    dcp.save(state, storage_writer=FileSystemWriter(str(dst)), no_dist=True,
             planner=_RawBytesSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
    shutil.copy2(src / "metadata.json", dst / "metadata.json")
    (dst_root / "latest_checkpointed_iteration.txt").write_text(iteration)
    if (src.parent / ROUTING_MARKER).exists():  # same routers, experts permuted: same policy
        shutil.copy2(src.parent / ROUTING_MARKER, dst_root / ROUTING_MARKER)


class _RawBytesSavePlanner(DefaultSavePlanner):
    """Writes BytesIO values as they are (the default planner would torch.save them again), and
    does not flatten keys: what Megatron's own saver does, so its loader reads the result."""

    def transform_object(self, write_item, object):
        return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)


def _raw_objects(src: Path, meta) -> Dict[str, io.BytesIO]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = {}
    for index, info in meta.storage_data.items():
        if isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(src / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            if len(data) != info.length:
                raise EOFError(f"{info.relative_path} ends before {index.fqn}")
            out[index.fqn] = io.BytesIO(data)
    return out


def _check(plan: Plan, state: Dict, plan_path: str, src: Path) -> None:
    keys = [k for k in state if _EXPERT_AXIS_KEYS.search(k)]
    if not keys:
        raise PlacementError(f"{src} has no MoE expert or router tensors to move.")
    for k in keys:
        shape = state[k].shape
        if shape[1] != plan.num_experts:
            raise PlacementError(f"{plan_path}: the plan is for {plan.num_experts} experts but "
                                 f"{src} has {shape[1]} in {k}.")
        bad = [layer for layer in plan.expert_to_slot if not 1 <= layer <= shape[0]]
        if bad:
            raise PlacementError(f"{plan_path}: layers {bad} are not in {src} ({shape[0]} layers in {k}).")


def _permute(state: Dict, plan: Plan, drop_optimizer: bool) -> int:
    moved = 0
    for key in list(state):
        if drop_optimizer and key.startswith("optimizer."):
            del state[key]
            continue
        if _EXPERT_AXIS_KEYS.search(key):
            t = state[key]
            for layer, slot in plan.expert_to_slot.items():
                new = torch.empty_like(t[layer - 1])
                new[slot] = t[layer - 1]        # expert e -> row slot[e]
                t[layer - 1] = new
            moved += 1
    renamed = {}
    for key in list(state):
        m = _EXTRA_STATE.match(key)
        if m and int(m.group(2)) + 1 in plan.expert_to_slot:
            layer, e = int(m.group(2)), int(m.group(3))
            slot = int(plan.expert_to_slot[layer + 1][e])
            renamed[f"{m.group(1)}{layer}.{slot}_{m.group(4)}.{m.group(5)}"] = state.pop(key)
    state.update(renamed)
    return moved
