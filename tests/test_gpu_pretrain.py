"""The plugin's pretrain entry on one GPU for every routing policy and layer variant (marker `gpu`).

Megatron's real `pretrain()` loop with NCCL, BF16 and the torch expert backend, without
Transformer Engine (the local transformer implementation), on mock data: a few iterations each,
so that what only a GPU exercises (CUDA tensors in the routers' per-iteration state, the
collectives of `on_iteration_end` on NCCL, the side stream of ScMoE, the Triton SwiGLU) runs
through the same code as on CPU. Each run must finish, log finite losses that fall, and report
the moe_ext metrics; LocMoE+'s re-estimated capacity must not exceed its starting one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the pretrain entry on a GPU")]

SHARED = ["--moe-shared-expert-intermediate-size", "256", "--moe-shared-expert-gate"]
RUNS = {
    "topk": [],
    "c2r-warmup-dedup": ["--moe-router-policy", "c2r", "--moe-c2r-top-t", "1", "--moe-c2r-warmup-steps", "4",
                         "--moe-dedup-dispatch"],
    "locmoe-bias-capacity": ["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias", "0.5",
                             "--moe-locmoe-local-bias-warmup-steps", "4", "--moe-locmoe-capacity", "bound",
                             "--moe-expert-capacity-factor", "1.25"],
    "locmoe-plus": ["--moe-router-policy", "locmoe-plus", "--moe-expert-capacity-factor", "1.0",
                    "--moe-locmoe-plus-reestimate-interval", "4"],
    "scmoe-pos1": ["--moe-scmoe", "pos1", *SHARED],
    "dgmoe": ["--moe-scmoe", "dgmoe"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(RUNS))
def test_pretrain_entry_on_one_gpu(tmp_path, name):
    from megatron_moe_ext.compat.presets import LOCAL_IMPL_FLAGS
    from megatron_moe_ext.training.presets import tiny_moe_flags

    log = tmp_path / "run.jsonl"
    iters = 12
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(_free_port()), "-m", "megatron_moe_ext.training.pretrain_gpt",
           *tiny_moe_flags(num_layers=4, hidden=256, experts=8, topk=2, ep=1, seq_length=256),
           *LOCAL_IMPL_FLAGS, "--bf16", "--moe-expert-backend", "torch",
           "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
           "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(iters),
           "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "6", "--eval-iters", "1",
           "--moe-ext-run-log", str(log), *RUNS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = os.environ.get("OUT")
    if out:  # keep every run's output for the notes
        with open(os.path.join(out, "gpu_pretrain_runs.log"), "a") as f:
            f.write(f"### {name}: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, iters + 1))
    losses = [r["lm loss"] for r in train]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(r["moe_ext/rows_per_token"] > 0 for r in train)
    if name == "locmoe-plus":
        assert train[-1]["moe_ext/expert_capacity"] <= train[0]["moe_ext/expert_capacity"]
    if out:
        with open(os.path.join(out, "gpu_pretrain_losses.jsonl"), "a") as f:
            f.write(json.dumps({"run": name, "losses": losses}) + "\n")
