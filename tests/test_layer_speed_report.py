"""benchmarks/layer_speed_report.py on the committed H200 run: the tables docs/performance.md
section 3 quotes come out of the JSON (ms, x floor, busy; router eager and graph; the step)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "docs", "results", "layer_speed_h200")


def _report(*extra):
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "layer_speed_report.py"),
                          os.path.join(RUN, "moe_layer.json"), *extra], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_tables_from_the_h200_run():
    text = _report("--step", os.path.join(RUN, "ep_step_time.json"), "--floor-ms", "0.92,3.21,26.69")
    assert "| torch bf16 device-splits +router kernel, cuda graph | 2.45 | 2.66x | 29.0% | 99% |" in text
    assert "| torch bf16 device-splits +router kernel, cuda graph | 6.22 | 1.94x | 37.4% | 99% |" in text
    assert "| topk kernel | 2.614 | 12% | 0.321 | 0.375 |" in text
    assert "| h device-splits +router kernel | 600 (586) | 1.155x | 450 ms (75%) |" in text
    assert "| h device-splits +router kernel +full-iteration graph | failed (rc 1) | | |" in text


def test_default_floor_is_the_runs_own_row_and_a_wrong_count_is_refused():
    assert "(floor 1.13 ms)" in _report()
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "layer_speed_report.py"),
                          os.path.join(RUN, "moe_layer.json"), "--floor-ms", "1,2"], capture_output=True, text=True)
    assert out.returncode != 0 and "3 shapes" in out.stderr


def test_a_captured_only_router_row_gets_its_own_line(tmp_path):
    import json

    run = json.load(open(os.path.join(RUN, "moe_layer.json")))
    first = next(iter(run["shapes"].values()))
    first["router topk kernel, megatron gating, cuda graph"] = {"router_ms": 0.4567}
    path = tmp_path / "moe_layer.json"
    path.write_text(json.dumps(run))
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "layer_speed_report.py"), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| topk kernel, megatron gating | | | | 0.457 |" in out.stdout
    assert "| topk kernel | 2.614 | 12% | 0.321 | 0.375 |" in out.stdout
