"""Output folders that appear whole or not at all.

Converters write into a hidden sibling folder and move it into place only when everything
succeeded, so a failure (bad input found late, a full disk, Ctrl-C) leaves no half-written
output, and an existing output is replaced only with `overwrite` and only at the very end."""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from megatron_moe_ext.errors import UserError


def check_output(out: Path, flag: str, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{flag} {out} exists and is not empty; give a new folder or pass --overwrite.")


@contextmanager
def staged_output(out: Path):
    """Yields a fresh staging folder; on success it replaces `out`, on error it is removed."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    stage.rename(out)
