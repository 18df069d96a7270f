"""Attention tensor parallelism (TP 2, sequence parallel, expert TP 1) through the plugin's real
pretrain entry on gloo ranks, against TP 1 with the same seed and data order.

Why the runs are comparable (docs/parallelism.md): TP 2 x EP 2 on 4 ranks has dense DP 2, as
TP 1 x EP 2 on 2 ranks does, so each DP replica reads the same micro-batches. Megatron's expert
mesh orders ranks expert-TP, EP, expert-DP: with expert TP 1 the EP groups are {0,1} and {2,3}
(each DP replica's two sequence shards dispatch among one full set of experts) and expert-DP is
2; an expert's gradient is summed over its two replicas and scaled by 1 / (dense DP 2), which is
TP 1's gradient (one replica of each expert, tokens of both DP ranks, scaled by 1/2).
`--use-cpu-initialization` builds every weight whole and splits it, so both start equal.

Tolerance: relative 1e-5 on the LM loss (about 6e-5 absolute). The runs differ only in the order
of fp32 sums (row-parallel partial products all-reduced over TP, norm and router gradients
summed over the TP shards), which is ~1e-7 relative per operation; on this machine the losses
differed by at most 9.5e-7 (1.6e-7 relative), most iterations bit-equal. A real TP bug fails
it: LocMoE's locality KL over each TP shard instead of the micro-batch (before it was pooled)
moved iteration 2 by 1e-4 (1.6e-5 relative) and iteration 5 by 2e-3.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pretrain_cpu, run_log_rows, train_losses

pytestmark = pytest.mark.dist

REL = 1e-5
SMALL = ("--seq-length", "32", "--max-position-embeddings", "32", "--eval-iters", "0")
TP2 = ("--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1")
SCMOE_POS1 = ("--moe-scmoe", "pos1", "--moe-shared-expert-intermediate-size", "128",
              "--moe-shared-expert-gate", "--moe-router-pre-softmax")
POLICIES = {
    "topk": (),
    "c2r-dedup": ("--moe-router-policy", "c2r", "--moe-dedup-dispatch"),
    "locmoe": ("--moe-router-policy", "locmoe", "--moe-locmoe-mu", "1.0"),
    "scmoe-pos1": SCMOE_POS1,
}
# Saved at TP 2 after iteration 3 and resumed at TP 1 (Megatron's distributed checkpoint reshards);
# topk also from expert TP 2.
RESUMED = {"c2r-dedup", "scmoe-pos1"}
# Counts that do not depend on which EP rank a token starts on (remote rows do: at TP 2 a
# replica's second sequence half starts on EP rank 1).
SAME_COUNTS = ("rows_per_token", "distinct_ranks_per_token", "tokens", "bytes_per_token")


def _run(tmp: Path, name: str, *flags: str, nproc: int, iters: int = 5, save_interval: int = 100):
    log = tmp / f"{name}.jsonl"
    pretrain_cpu(tmp, tmp / name, log, *SMALL, *flags, "--save-interval", str(save_interval),
                 nproc=nproc, train_iters=iters)
    return log


def _assert_losses_agree(got: dict, want: dict, iterations, label: str = "") -> None:
    for it in iterations:  # the table docs/parallelism.md shows (pytest -s prints it)
        print(f"| {label} | {it} | {got[it]:.7f} | {want[it]:.7f} | {abs(got[it] - want[it]):.1e} |")
    for it in iterations:
        assert got[it] == pytest.approx(want[it], rel=REL), (it, got, want)


@pytest.mark.parametrize("name", list(POLICIES))
def test_tp2_ep2_matches_tp1_ep2(tmp_path, name):
    flags = POLICIES[name]
    trace = name == "c2r-dedup"
    # C2R's run also pins two GPUs per node: with expert TP 1 the TP pair {0,1} is EP ranks 0 and
    # 1 on one node, so no row is inter-node (counting EP ranks TP-strided said every remote row was)
    trace2 = ("--save-routing-trace", str(tmp_path / "trace2"), "--moe-ranks-per-node", "2") if trace else ()
    trace1 = ("--save-routing-trace", str(tmp_path / "trace1")) if trace else ()
    tp2_log = _run(tmp_path, "tp2", *TP2, *flags, *trace2, nproc=4,
                   save_interval=3 if name in RESUMED else 100)
    tp1_log = _run(tmp_path, "tp1", *flags, *trace1, nproc=2)
    tp2, tp1 = train_losses(tp2_log), train_losses(tp1_log)
    assert sorted(tp2) == sorted(tp1) == [1, 2, 3, 4, 5]
    _assert_losses_agree(tp2, tp1, range(1, 6), f"{name}: TP2xEP2 vs TP1xEP2")

    # The metrics count each token once (each TP rank routes its own sequence shard): the same
    # tokens, rows and per-expert loads as at TP 1.
    rows2 = [r for r in run_log_rows(tp2_log) if r["kind"] == "train"]
    rows1 = [r for r in run_log_rows(tp1_log) if r["kind"] == "train"]
    for r2, r1 in zip(rows2, rows1):
        assert r2["moe_ext/tokens"] == 4 * 32  # global batch x sequence, per layer
        for k in SAME_COUNTS:
            assert r2[f"moe_ext/{k}"] == pytest.approx(r1[f"moe_ext/{k}"], rel=1e-9), k
        for layer in (1, 2):
            key = f"moe_ext/layer_{layer}/expert_load"
            assert r2[key] == pytest.approx(r1[key], rel=1e-9)
    if name == "c2r-dedup":
        assert all(r["moe_ext/rows_per_token"] == 1.0 for r in rows2)  # one rank per token
        assert all(r["moe_ext/remote_rows_per_token"] > 0 for r in rows2)
        assert all(r["moe_ext/inter_node_rows_per_token"] == 0.0 for r in rows2)
    if trace:
        _assert_traces_hold_the_same_tokens(tmp_path / "trace2", tmp_path / "trace1")

    if name in RESUMED:
        resumed = _resume_at_tp1(tmp_path, tmp_path / "tp2", flags)
        _assert_losses_agree(resumed, tp2, (4, 5), f"{name}: TP1xEP2 resumed from TP2 iter 3 vs TP2")
    if name == "topk":
        # Expert TP 2 with Megatron's own experts (SequentialMLP) and alltoall dispatcher: the
        # expert mesh is ETP 2 x EP 2 (expert-DP 1), each expert's fc1/fc2 split over two ranks.
        etp2_log = _run(tmp_path, "etp2", *TP2[:-1], "2", nproc=4, save_interval=3)
        etp2 = train_losses(etp2_log)
        _assert_losses_agree(etp2, tp1, range(1, 6), "topk: TP2xETP2xEP2 vs TP1xEP2")
        resumed = _resume_at_tp1(tmp_path, tmp_path / "etp2", flags)
        _assert_losses_agree(resumed, etp2, (4, 5), "topk: TP1xEP2 resumed from TP2xETP2 iter 3 vs TP2xETP2")


def _resume_at_tp1(tmp_path: Path, saved: Path, flags) -> dict:
    """Resume at TP 1 x EP 2 from `saved`'s iteration-3 checkpoint alone; iterations 4-5."""
    resume = tmp_path / f"resume_{saved.name}"
    resume.mkdir()
    shutil.copytree(saved / "iter_0000003", resume / "iter_0000003")
    (resume / "latest_checkpointed_iteration.txt").write_text("3")
    log = tmp_path / f"resume_{saved.name}.jsonl"
    pretrain_cpu(tmp_path, resume, log, *SMALL, *flags, "--save-interval", "100",
                 nproc=2, train_iters=5)
    resumed = train_losses(log)
    assert sorted(resumed) == [4, 5]
    return resumed


def _assert_traces_hold_the_same_tokens(tp2_dir: Path, tp1_dir: Path) -> None:
    """The TP 2 trace files (one per rank, each its sequence shard) hold every token once: the
    same router logits as TP 1's two files, in another order."""
    from megatron_moe_ext.files.trace import load_trace

    t2, t1 = load_trace(tp2_dir), load_trace(tp1_dir)
    assert len(t2.files) == 4 and len(t1.files) == 2
    for layer in t1.logits:
        a, b = t2.logits[layer], t1.logits[layer]
        assert a.shape == b.shape == (4 * 32, 4)
        key = lambda x: x[torch.argsort(x[:, 0] * 1e3 + x[:, 1])]  # noqa: E731
        torch.testing.assert_close(key(a), key(b), rtol=1e-5, atol=1e-6)


def test_tp2_pp2_matches_tp1_pp2(tmp_path):
    """Top-k routing under TP 2 x PP 2 (4 ranks, DP 1) against TP 1 x PP 2 (2 ranks, DP 1)."""
    pp = ("--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1")
    tp2 = train_losses(_run(tmp_path, "tp2", *TP2, *pp, nproc=4))
    tp1 = train_losses(_run(tmp_path, "tp1", *pp, nproc=2))
    assert sorted(tp2) == sorted(tp1) == [1, 2, 3, 4, 5]
    _assert_losses_agree(tp2, tp1, range(1, 6), "topk: TP2xPP2 vs TP1xPP2")


def test_megatron_still_refuses_moe_tp_without_sequence_parallel(tmp_path):
    """The CPU layer makes sequence parallelism possible; it must not make it optional: Megatron's
    own check (MoELayer.forward) still stops TP 2 training without --sequence-parallel."""
    proc = pretrain_cpu(tmp_path, tmp_path / "ckpt", tmp_path / "log.jsonl", *SMALL,
                        "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                        "--expert-model-parallel-size", "1", nproc=2, train_iters=1, expect_rc=1)
    assert "without also enabling sequence parallelism" in proc.stdout + proc.stderr


def test_replicated_tp_tokens_are_counted_once(tmp_path):
    """Without sequence parallelism (evaluation only: Megatron refuses to train so) both TP ranks
    route the same tokens; the recorder counts them on TP rank 0 only. Validation and test of a
    4 x 32-token global batch each: 256 tokens in the collaboration profile (512 when every TP
    rank counted, as before the fix)."""
    prof = tmp_path / "prof"
    pretrain_cpu(tmp_path, tmp_path / "ckpt", tmp_path / "log.jsonl", *SMALL[:4],
                 "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                 "--expert-model-parallel-size", "1", "--skip-train", "--eval-iters", "1",
                 "--moe-profile-collaboration", str(prof), nproc=2, train_iters=1)
    assert json.loads((prof / "profile.json").read_text())["tokens"] == 2 * 4 * 32
