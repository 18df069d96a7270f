"""`megatron-moe-ext comm-volume`: JSON fields, determinism, traces, one-sentence errors."""

import json
import subprocess
import sys

import pytest
import torch

from megatron_moe_ext.cli import main
from megatron_moe_ext.files.trace import save_trace, trace_path

FIELDS = ("policy", "rows_per_token", "remote_rows_per_token", "inter_node_rows_per_token",
          "distinct_ranks_per_token", "stock_rows_per_token", "stock_remote_rows_per_token",
          "stock_inter_node_rows_per_token")


def _json(capsys, *argv):
    assert main(["comm-volume", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_fields_and_expected_values(capsys):
    out = _json(capsys, "--experts", "64", "--topk", "4", "--ep", "8", "--ranks-per-node", "4",
                "--tokens", "20000")
    assert all(f in out for f in FIELDS)
    assert out["rows_per_token"] == out["stock_rows_per_token"] == 4.0
    # uniform random top-4 of 64 experts, 8 per rank: remote = 4 * 7/8, inter-node = 4 * 4/8,
    # distinct ranks = 8 * (1 - C(56,4)/C(64,4)) = 3.3757
    assert out["remote_rows_per_token"] == pytest.approx(3.5, abs=0.03)
    assert out["inter_node_rows_per_token"] == pytest.approx(2.0, abs=0.03)
    assert out["distinct_ranks_per_token"] == pytest.approx(3.3757, abs=0.03)


def test_dedup_sends_one_row_per_rank_and_is_deterministic(capsys):
    a = _json(capsys, "--experts", "16", "--topk", "4", "--ep", "4", "--dedup", "--seed", "3")
    b = _json(capsys, "--experts", "16", "--topk", "4", "--ep", "4", "--dedup", "--seed", "3")
    assert a == b
    assert a["rows_per_token"] == a["distinct_ranks_per_token"] < a["stock_rows_per_token"] == 4


def test_subprocess_prints_one_json_object():
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_ext.cli", "comm-volume", "--experts",
                           "8", "--topk", "2", "--ep", "2", "--tokens", "1000", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(f in json.loads(proc.stdout) for f in FIELDS)


def test_trace_round_trip(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    for rank in (0, 1):
        logits = torch.randn(100, 8, generator=g)
        logits[:, rank * 4:(rank + 1) * 4] += 10.0  # every token prefers its own rank's experts
        save_trace(trace_path(tmp_path, 5, rank), {1: logits, 2: logits.clone()}, iteration=5,
                   num_experts=8, topk=2, ep_size=2, ep_rank=rank, ep_ranks_per_node=1)
    out = _json(capsys, "--trace", str(tmp_path))
    assert out["tokens"] == 400 and set(out["layers"]) == {"1", "2"}
    assert out["remote_rows_per_token"] == 0.0 and out["distinct_ranks_per_token"] == 1.0


def test_locmoe_plus_routes_offline_within_capacity(capsys):
    out = _json(capsys, "--policy", "locmoe-plus", "--experts", "16", "--topk", "2", "--ep", "4",
                "--tokens", "4096", "--tau", "0.5", "--capacity-factor", "0.5")
    # token choice proposes at most k; expert choice keeps at most half the k-per-token capacity
    assert 0 < out["rows_per_token"] <= 0.5 * 2 + 1e-9


def test_offline_selection_ranks_what_training_ranked(tmp_path, capsys):
    """A trace of a sigmoid router with expert bias: offline top-k ranks sigmoid + bias, as
    training did, not the raw logits."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 8, generator=g)
    bias = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])  # training always chose experts 0 and 1 (rank 0)
    for rank in (0, 1):
        save_trace(trace_path(tmp_path, 1, rank),
                   {1: {"logits": logits, "score_function": "sigmoid", "pre_softmax": False,
                        "expert_bias": bias}},
                   iteration=1, num_experts=8, topk=2, ep_size=2, ep_rank=rank, ep_ranks_per_node=1)
    out = _json(capsys, "--trace", str(tmp_path))
    # every token goes to rank 0 only: rank 0's tokens stay, rank 1's send both rows away
    layer = out["layers"]["1"]
    assert layer["distinct_ranks_per_token"] == 1.0 and layer["remote_rows_per_token"] == 1.0
    # ranking the raw logits instead would spread tokens over both ranks
    assert out["stock_rows_per_token"] == 2.0


@pytest.mark.parametrize("argv, flag", [
    (["--experts", "0"], "--experts"),
    (["--experts", "8", "--topk", "0", "--ep", "2"], "--topk"),
    (["--ep", "0"], "--ep"),
    (["--ranks-per-node", "0"], "--ranks-per-node"),
    (["--policy", "topk", "--top-t", "3"], "--top-t"),
    (["--policy", "locmoe", "--local-bias", "nan"], "--local-bias"),
    (["--skew", "nan"], "--skew"),
    (["--experts", "60", "--ep", "8"], "--experts"),
    (["--experts", "8", "--topk", "9", "--ep", "2"], "--topk"),
    (["--experts", "64", "--ep", "8", "--ranks-per-node", "3"], "--ranks-per-node"),
])
def test_bad_flags_fail_with_one_sentence(capsys, argv, flag):
    assert main(["comm-volume", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err


def test_not_a_trace_is_named(tmp_path, capsys):
    bad = tmp_path / "routing_trace_x.pt"
    torch.save({"hello": 1}, bad)
    assert main(["comm-volume", "--trace", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_ep1_trace_is_read_at_ep8(tmp_path, capsys):
    """A one-GPU (EP 1) trace read at --ep 8: tokens in 8 contiguous blocks, block r on rank r."""
    T, E = 800, 16
    logits = torch.full((T, E), -10.0)
    src = torch.arange(T) * 8 // T
    logits[torch.arange(T), 2 * src] = 10.0          # every token's top-2 are its own block's rank's
    logits[torch.arange(T), 2 * src + 1] = 9.0
    save_trace(trace_path(tmp_path, 3, 0), {1: logits}, iteration=3, num_experts=E, topk=2,
               ep_size=1, ep_rank=0, ep_ranks_per_node=1)
    one = _json(capsys, "--trace", str(tmp_path))
    assert one["ep"] == 1 and one["remote_rows_per_token"] == 0.0
    at8 = _json(capsys, "--trace", str(tmp_path), "--ep", "8", "--ranks-per-node", "4")
    assert at8["ep"] == 8 and at8["ranks_per_node"] == 4 and at8["tokens"] == T
    assert at8["remote_rows_per_token"] == 0.0 and at8["distinct_ranks_per_token"] == 1.0
    logits[:, :2] += 30.0                            # now every token wants rank 0's experts
    save_trace(trace_path(tmp_path, 3, 0), {1: logits}, iteration=3, num_experts=E, topk=2,
               ep_size=1, ep_rank=0, ep_ranks_per_node=1)
    at8 = _json(capsys, "--trace", str(tmp_path), "--ep", "8", "--ranks-per-node", "4")
    assert at8["remote_rows_per_token"] == pytest.approx(2 * 7 / 8)     # all but block 0 remote
    assert at8["inter_node_rows_per_token"] == pytest.approx(2 * 4 / 8)  # blocks 4-7 off node 0


def test_multi_rank_trace_is_not_reinterpreted(tmp_path, capsys):
    for rank in (0, 1):
        save_trace(trace_path(tmp_path, 1, rank), {1: torch.randn(10, 8)}, iteration=1, num_experts=8,
                   topk=2, ep_size=2, ep_rank=rank, ep_ranks_per_node=2)
    assert main(["comm-volume", "--trace", str(tmp_path), "--ep", "4", "--json"]) != 0
    assert "only an EP-1 trace" in capsys.readouterr().err


def test_group_limited_routing_offline(capsys):
    """Megatron's group-limited routing: group-topk 1 keeps a token's experts on one group (rank)."""
    base = ["--experts", "16", "--topk", "2", "--ep", "8", "--tokens", "4000", "--dedup"]
    g1 = _json(capsys, *base, "--router-num-groups", "8", "--router-group-topk", "1")
    g2 = _json(capsys, *base, "--router-num-groups", "8", "--router-group-topk", "2")
    plain = _json(capsys, *base)
    assert g1["distinct_ranks_per_token"] == 1.0 and g1["rows_per_token"] == 1.0
    assert g2["rows_per_token"] == plain["rows_per_token"] > 1.0    # 2 groups at top-2: plain top-k
    assert main(["comm-volume", *base, "--router-num-groups", "3", "--router-group-topk", "1"]) != 0
