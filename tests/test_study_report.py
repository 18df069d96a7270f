"""benchmarks/study_report.py: paired differences to top-k, the noise rule, verdicts, the table and
the plots, on hand-made per-run JSON whose answers are known."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def _run(folder, row, seed, loss, **extra):
    r = {"row": row, "seed": seed, "completed": True, "valid_loss": loss,
         "valid_curve": [[8, loss + 1], [16, loss + 0.1], [16, loss]], "load_cv": 0.1,
         "tokens_per_s": 1000.0, "ep8_1node_rows_per_token": 2.0, "ep8_1node_remote_rows_per_token": 1.75,
         "ep8_2x4_inter_node_rows_per_token": 1.0, **extra}
    (folder / f"{row}_s{seed}.json").write_text(json.dumps(r))


def test_paired_deltas_noise_and_verdicts(tmp_path):
    import study_report as sr

    _run(tmp_path, "topk", 1, 3.00)
    _run(tmp_path, "topk", 2, 3.10)
    _run(tmp_path, "c2r-warmup-t1", 1, 3.05, ep8_1node_rows_per_token=1.0)   # deltas 0.05, 0.07
    _run(tmp_path, "c2r-warmup-t1", 2, 3.17, concurrent_jobs=4, tokens_per_s=500.0)
    _run(tmp_path, "device-limited-g1", 1, 3.20)                               # deltas 0.20, 0.10
    _run(tmp_path, "device-limited-g1", 2, 3.20)
    _run(tmp_path, "locmoe", 1, 3.04)          # one seed: judged against the median spread 0.06
    _run(tmp_path, "scmoe-pos2", 2, 2.90)      # one seed, -0.20: helps
    _run(tmp_path, "shared-only", 1, 3.50)
    _run(tmp_path, "dgmoe", 1, 3.3, completed=False)   # not completed: left out
    recs = {r["row"]: r for r in sr.summarize(sr.load_runs(str(tmp_path)))}
    assert "dgmoe" not in recs
    c2r = recs["c2r-warmup-t1"]
    assert c2r["delta_vs_topk"] == pytest.approx(0.06) and c2r["delta_spread"] == pytest.approx(0.02)
    assert c2r["verdict"] == "hurts" and c2r["noise_source"] == "own seeds"
    assert c2r["tokens_per_s_alone"] == 1000.0 and c2r["tokens_per_s_shared"] == 500.0
    assert recs["device-limited-g1"]["verdict"] == "hurts"        # 0.15 > its spread 0.10
    assert recs["locmoe"]["noise"] == pytest.approx(0.06)           # median of 0.02 and 0.10
    assert recs["locmoe"]["verdict"] == "no difference (one seed)"  # 0.04 < 0.06
    assert recs["scmoe-pos2"]["verdict"] == "helps (one seed)"
    assert recs["scmoe-pos2"]["model_rows_per_token_per_layer"] == 1.0   # every other layer routes
    assert recs["shared-only"]["model_rows_per_token_per_layer"] == 0.0
    table = sr.table(list(recs.values()))
    assert "| `c2r-warmup-t1` | 1,2 | 3.1100 +- 0.0600 |" in table and "+0.0600 (+2.0%)" in table
    written = sr.plot(sr.load_runs(str(tmp_path)), list(recs.values()), str(tmp_path / "png"))
    assert all(os.path.getsize(p) > 10_000 for p in written)
