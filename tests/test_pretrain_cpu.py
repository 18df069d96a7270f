"""The plugin's pretrain entry runs Megatron's whole pretrain() loop on CPU with EP=2 over two gloo
ranks, saves a distributed checkpoint, and a run resumed from it continues with the same losses."""

import shutil

import pytest
from conftest import pretrain_cpu as _pretrain
from conftest import run_log_rows as _rows
from conftest import train_losses as _train_losses

pytestmark = pytest.mark.dist


def test_pretrain_ep2_checkpoint_resume_matches_uninterrupted(tmp_path):
    full_ckpt, full_log = tmp_path / "full", tmp_path / "full.jsonl"
    # Ranks per node 1: the two EP ranks count as two nodes, so remote rows are inter-node rows.
    _pretrain(tmp_path, full_ckpt, full_log, "--moe-ranks-per-node", "1",
              "--save-routing-trace", str(tmp_path / "trace"))
    full = _train_losses(full_log)
    assert sorted(full) == list(range(1, 9))
    assert all(v == v and 0 < v < 20 for v in full.values())  # finite, sane
    assert (full_ckpt / "iter_0000005").is_dir() and (full_ckpt / "iter_0000008").is_dir()

    # moe_ext metrics every iteration: the stock dispatcher sends top-k = 2 rows per token.
    train_rows = [r for r in _rows(full_log) if r["kind"] == "train"]
    for r in train_rows:
        assert r["moe_ext/rows_per_token"] == 2.0
        assert 0 < r["moe_ext/remote_rows_per_token"] < 2.0
        assert r["moe_ext/inter_node_rows_per_token"] == r["moe_ext/remote_rows_per_token"]
        assert r["moe_ext/distinct_ranks_per_token"] >= 1.0 and r["moe_ext/distinct_ranks_per_token"] <= 2.0
        assert r["moe_ext/tokens"] == 4 * 64  # global batch x sequence, per layer
        assert sum(r["moe_ext/layer_1/expert_load"]) == pytest.approx(1.0)
    # A routing trace of the last iteration from each rank, readable by comm-volume.
    from megatron_moe_ext.files.trace import load_trace

    trace = load_trace(tmp_path / "trace")
    assert len(trace.files) == 2 and set(trace.logits) == {1, 2}
    assert trace.logits[1].shape == (2 * 2 * 64, 4)  # 2 ranks x micro-batch 2 x seq 64

    # Resume from the iteration-5 checkpoint alone.
    resume_ckpt, resume_log = tmp_path / "resume", tmp_path / "resume.jsonl"
    resume_ckpt.mkdir()
    shutil.copytree(full_ckpt / "iter_0000005", resume_ckpt / "iter_0000005")
    (resume_ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    _pretrain(tmp_path, resume_ckpt, resume_log)
    resumed = _train_losses(resume_log)
    assert sorted(resumed) == [6, 7, 8]
    for it in (6, 7, 8):
        assert resumed[it] == pytest.approx(full[it], rel=1e-5, abs=1e-5), it


def test_pretrain_c2r_with_dedup_dispatch_sends_one_row_per_token(tmp_path):
    """C2R with the default co-resident partners keeps every token on one EP rank, so the
    deduplicating dispatcher sends exactly one row per token (stock top-k would send two)."""
    log = tmp_path / "c2r.jsonl"
    _pretrain(tmp_path, tmp_path / "ckpt", log, "--moe-router-policy", "c2r",
              "--moe-dedup-dispatch", "--moe-ranks-per-node", "1")
    rows = [r for r in _rows(log) if r["kind"] == "train"]
    assert len(rows) == 8 and all(0 < r["lm loss"] < 20 for r in rows)
    for r in rows:
        assert r["moe_ext/rows_per_token"] == 1.0 == r["moe_ext/distinct_ranks_per_token"]
        assert 0 < r["moe_ext/remote_rows_per_token"] < 1.0


def test_pretrain_c2r_dedup_with_pipeline_and_expert_parallel(tmp_path):
    """PP=2 x EP=2 on 4 gloo ranks: the plugin's router and dispatcher under Megatron's pipeline
    schedule (each stage holds one of the two MoE layers)."""
    log = tmp_path / "pp.jsonl"
    _pretrain(tmp_path, tmp_path / "ckpt", log, "--pipeline-model-parallel-size", "2",
              "--moe-router-policy", "c2r", "--moe-dedup-dispatch", nproc=4, train_iters=4)
    rows = [r for r in _rows(log) if r["kind"] == "train"]
    assert len(rows) == 4 and all(0 < r["lm loss"] < 20 for r in rows)
    assert all(r["moe_ext/rows_per_token"] == 1.0 for r in rows)
    assert {"moe_ext/layer_1/rows_per_token", "moe_ext/layer_2/rows_per_token"} <= set(rows[0])
