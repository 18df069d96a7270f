"""benchmarks/ep_step_time.py on CPU (two gloo ranks, tiny model): the driver runs the real
pretrain entry per row, parses step times, and reads the dispatch metrics that the GPU table quotes."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_rows_run_and_report_dispatch_volume(tmp_path):
    out = tmp_path / "ep"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ep_step_time.py"), "--cpu", "--tiny",
                        "--nproc", "2", "--out", str(out), "--warmup", "1", "--timed", "2", "--port", "29533",
                        "--rows", "stock,c2r +dedup,stock +a2a overlap"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["row"]: row for row in json.load(open(out / "ep_step_time.json"))["rows"]}
    assert rows["stock +a2a overlap"]["rc"] == "skipped (needs cuda)"
    for name in ("stock", "c2r +dedup"):
        assert rows[name]["completed"] and rows[name]["iterations_timed"] == 2 and rows[name]["step_ms"] > 0
    # top-4 of 8 experts on 2 ranks: stock sends a row per (token, expert); C2R with co-resident
    # partners + dedup sends one per token
    assert rows["stock"]["metrics"]["moe_ext/rows_per_token"] == 4.0
    assert rows["c2r +dedup"]["metrics"]["moe_ext/rows_per_token"] == 1.0
    assert rows["c2r +dedup"]["metrics"]["moe_ext/distinct_ranks_per_token"] == 1.0
    assert (out / "ep_logs.tar.gz").stat().st_size > 0
    assert "| stock | " in r.stdout
