"""Shared pytest helpers: launching tests/dist scripts under torchrun with gloo ranks on CPU, and
the Triton kernels under the interpreter in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST_DIR = Path(__file__).parent / "dist"


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/dist/<script> on `nproc` gloo ranks; fail the test with the output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(DIST_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), str(DIST_DIR / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_interpreted(code: str, timeout: int = 600) -> None:
    """Run `code` in a child Python under TRITON_INTERPRET=1 (Triton picks the interpreter when it
    compiles, so it must be set before the kernels' first launch), from the tests folder, and
    assert it exits 0 after printing "ok"."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).parent)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and bytes under `path` (inputs must stay untouched)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun_json(tmp_path):
    """Call as torchrun_json(script, nproc, *args): runs it with OUT.json first, returns the dict."""

    def _run(script: str, nproc: int, *args: str, timeout: int = 600) -> dict:
        out = tmp_path / f"{Path(script).stem}_{nproc}.json"
        run_torchrun(script, nproc, str(out), *args, timeout=timeout)
        return json.loads(out.read_text())

    return _run


@pytest.fixture(scope="session")
def megatron_cpu():
    """One gloo rank with Megatron's model-parallel state (TP=PP=EP=1) in this pytest process,
    through the CPU compatibility layer. Returns the tiny-config builder from tests/dist/common."""
    sys.path.insert(0, str(DIST_DIR))
    import common  # enables the compatibility layer before megatron is imported
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                               rank=0, world_size=1)
    common.init_model_parallel(ep=1)
    return common


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    """host_reads(fn) runs fn() and returns its Python-level reads of tensors to the host
    (Tensor.item, tolist, cpu, numpy, bool/int/float of a tensor), each with where it happened:
    what a CUDA graph capture or a host that never waits for the GPU cannot have."""
    import traceback

    import torch

    def run(fn):
        reads = []

        def guarded(method, orig):
            def f(self, *a, **kw):
                where = [fr for fr in traceback.extract_stack()[:-1] if "site-packages/torch" not in fr.filename]
                reads.append(f"{method} at " + " <- ".join(f"{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}"
                                                            for fr in reversed(where[-3:])))
                return orig(self, *a, **kw)
            return f

        for method in HOST_READS:
            monkeypatch.setattr(torch.Tensor, method, guarded(method, getattr(torch.Tensor, method)))
        try:
            fn()
        finally:
            monkeypatch.undo()
        return reads

    return run


# --- the plugin's pretrain entry on 2 CPU gloo ranks (EP=2), tiny model, mock data -------------

TINY_MODEL = dict(num_layers=2, hidden=64, experts=4, topk=2, ep=2, seq_length=64)


def pretrain_cpu_cmd(ckpt: Path, log: Path, *extra: str, train_iters: int = 8, nproc: int = 2,
                     module: str = "megatron_moe_ext.training.pretrain_gpt") -> list:
    from megatron_moe_ext.training.presets import tiny_moe_flags

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", module, "--cpu",
            *tiny_moe_flags(**TINY_MODEL),
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(train_iters),
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
            "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
            # Dropout off: with it on, a resumed DataLoader draws its base seed from the restored
            # CPU generator at another point than the uninterrupted run does, so masks differ.
            "--hidden-dropout", "0", "--attention-dropout", "0",
            "--save-interval", "5", "--save", str(ckpt), "--load", str(ckpt),
            "--moe-ext-run-log", str(log), *extra]


def pretrain_cpu(tmp: Path, ckpt: Path, log: Path, *extra: str, train_iters: int = 8,
                 nproc: int = 2, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run the plugin's entry on gloo ranks; assert its exit code (with the output on failure)."""
    proc = subprocess.run(pretrain_cpu_cmd(ckpt, log, *extra, train_iters=train_iters, nproc=nproc),
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_log_rows(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()]


def train_losses(log: Path) -> dict:
    return {r["iteration"]: r["lm loss"] for r in run_log_rows(log) if r["kind"] == "train"}
