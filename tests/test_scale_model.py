"""benchmarks/scale_model.py runs from the repository's files alone and its projection has the
expected monotone properties."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scale_model_projection(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "scale_model.py"),
                           "--gpus", "8,16,32,64,128", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| GPUs | EP | policy |" in proc.stdout and "papers vs model" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["constants"]["nvlink_GBps"] == 450.0 and doc["constants"]["ib_GBps"] == 50.0
    rows = {(r["gpus"], r["policy"]): r for r in doc["rows"]}
    gpus = [8, 16, 32, 64, 128]
    topk_share = [rows[(n, "topk")]["inter_node_share"] for n in gpus]
    assert topk_share[0] == 0.0                                    # one node: nothing inter-node
    assert all(a < b for a, b in zip(topk_share[:4], topk_share[1:4]))   # more nodes per EP group
    assert topk_share[4] == topk_share[3]                           # EP is capped at 64 experts
    for n in gpus:
        t, c = rows[(n, "topk")], rows[(n, "c2r+dedup (one rank)")]
        assert c["rows_per_token"] <= t["rows_per_token"] and c["bytes_ms"] <= t["bytes_ms"]
        assert rows[(n, "topk")]["speedup_const"] == 1.0
        # ScMoE hides only bytes, never more than there are
        s = rows[(n, "scmoe pos1")]
        assert 0 <= s["hidden_ms"] <= s["bytes_ms"]
        assert rows[(n, "locmoe bias 0.6")]["inter_node_rows_per_token"] <= t["inter_node_rows_per_token"]
    assert rows[(8, "c2r+dedup (one rank)")]["rows_per_token"] == 1.0     # one rank, sent once
    assert rows[(16, "c2r+dedup (one rank)")]["step_ms_const"] < rows[(16, "topk")]["step_ms_const"]
    # more bytes time for top-k as the EP group spans more nodes
    assert rows[(64, "topk")]["bytes_ms"] > rows[(16, "topk")]["bytes_ms"] > rows[(8, "topk")]["bytes_ms"]
    assert {c["claim"].split()[0] for c in doc["paper_checks"]} >= {"ScMoE", "C2R", "LocMoE", "DeepSeek-V3"}
