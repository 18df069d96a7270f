"""benchmarks/quality_study.py --cpu --tiny: two rows (plain top-k; C2R after a top-k warm-up,
emulating EP 8's placement on one rank) train on a small prepared dataset, write one JSON per run
with the study's fields and a summary table, and the offline EP-8 traffic is what the policies
promise (C2R one rank per token with dedup: 1.0 row per token)."""

import gzip
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.dist
def test_quality_study_cpu_tiny(tmp_path):
    from megatron_moe_ext.training.data import SHIPPED_CORPUS, PrepareDataConfig, prepare_data

    text = tmp_path / "in.txt"
    text.write_text(gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8").read()[:400_000], encoding="utf-8")
    data = prepare_data(tmp_path / "data", [text], PrepareDataConfig(vocab_size=512), verbose=False)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "quality_study.py"), "--cpu", "--tiny",
         "--rows", "topk,c2r-warmup-t1", "--seeds", "7", "--tokens", "1024", "--data", data.output_dir,
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| topk | 7 |" in proc.stdout and "| c2r-warmup-t1 | 7 |" in proc.stdout
    results = {}
    for row in ("topk", "c2r-warmup-t1"):
        r = json.loads((out / "results" / f"{row}_s7.json").read_text())
        results[row] = r
        assert r["completed"] and r["rc"] == 0, r.get("log_tail")
        assert r["iterations"] == 8 and r["tokens_budget"] == 8 * 2 * 64
        assert r["valid_curve"] and all(math.isfinite(v) for _, v in r["valid_curve"])
        assert r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"]))
        assert r["tokens_per_s"] > 0 and r["load_cv"] is not None and r["load_cv"] >= 0
        assert "pretrain_gpt" in r["commands"][-1] and "<data>" in r["commands"][-1]
        assert str(tmp_path) not in r["commands"][-1]
        for topo in ("ep8_1node", "ep8_2x4"):
            v = r["comm_volume"][topo]
            assert v["ep"] == 8 and v["tokens"] > 0 and "EP 1 read at EP 8" in v["source"]
            assert 0 <= v["inter_node_rows_per_token"] <= v["remote_rows_per_token"] <= v["rows_per_token"]
        assert r["comm_volume"]["ep8_1node"]["inter_node_rows_per_token"] == 0
    assert "--moe-c2r-layout-ep 8" in results["c2r-warmup-t1"]["commands"][-1]
    assert results["topk"]["ep8_1node_rows_per_token"] == 2.0          # top-2, Megatron's dispatcher
    assert results["c2r-warmup-t1"]["ep8_1node_rows_per_token"] == 1.0  # one rank, sent once
    summary = json.loads((out / "summary.json").read_text())
    assert [r["row"] for r in summary["results"]] == ["topk", "c2r-warmup-t1"]
    assert (out / "summary.md").read_text().startswith("| row | seed |")


@pytest.mark.parametrize("rows,seeds,want", [
    ("topk,c2r-warmup-t1", "1,2", [("topk", 1), ("c2r-warmup-t1", 1), ("topk", 2), ("c2r-warmup-t1", 2)]),
    ("c2r-plan-t3", "5", [("topk", 5), ("c2r-plan-t3", 5)]),
    ("locmoe@2,c2r-plan-t1,scmoe-pos2@2", "1", [("locmoe", 2), ("scmoe-pos2", 2), ("topk", 1), ("c2r-plan-t1", 1)]),
])
def test_parse_runs_row_at_seed(rows, seeds, want):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from quality_study import parse_runs

    assert parse_runs(rows, seeds) == want


@pytest.mark.parametrize("rows", ["nope", "topk@x"])
def test_parse_runs_rejects(rows):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from quality_study import parse_runs

    with pytest.raises(ValueError):
        parse_runs(rows, "1")
