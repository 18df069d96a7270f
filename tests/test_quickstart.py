"""README's first command, shortened: the quickstart trains, the loss falls, files are written."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist


def test_quickstart_short_run(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe_ext.cli", "quickstart", "--output-dir", str(out),
         "--train-iters", "60"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_fell"] and summary["train_loss_last"] < summary["train_loss_first"] - 0.5
    assert summary["moe_ext_metrics_mean"]["moe_ext/rows_per_token"] == 2.0
    assert len(summary["expert_load_last"]) == 4  # one per MoE layer
    assert (out / "quickstart.png").stat().st_size > 10_000
    assert "validation loss" in proc.stdout and "moe_ext/rows_per_token" in proc.stdout
