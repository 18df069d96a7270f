"""Shared helpers of the HF conversion tests (tests/test_hf_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tree_hash  # noqa: F401  (re-exported for the HF tests)

DIST_DIR = Path(__file__).parent / "dist"
REPO = Path(__file__).parent.parent


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`megatron-moe-ext ARGS` in a fresh process (Megatron keeps process-wide state)."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_moe_ext.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def megatron_vs_hf(
    tmp: Path,
    flags,
    ckpt_iter: Path | None,
    hf_dir: Path,
    resave: Path | None = None,
    import_to: Path | None = None,
) -> dict:
    """Run tests/dist/hf_megatron_check.py (one CPU rank): Megatron's and HF's logits compared
    (with `import_to`: import `hf_dir` there first, then compare)."""
    import shlex

    out = tmp / f"check_{hf_dir.name}.json"
    cmd = [sys.executable, str(DIST_DIR / "hf_megatron_check.py"), str(out), "--hf", str(hf_dir)]
    if import_to:
        cmd += ["--import-to", str(import_to)]
    else:
        flags_file = tmp / f"flags_{hf_dir.name}.txt"
        flags_file.write_text(flags if isinstance(flags, str) else shlex.join(flags))
        cmd += ["--flags-file", str(flags_file), "--ckpt", str(ckpt_iter)]
    cmd += ["--resave", str(resave)] if resave else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def hf_tensors(hf_dir: Path) -> dict:
    """Every tensor of an HF folder's safetensors files, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
