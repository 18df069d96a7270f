"""The C2R workflow on real Megatron checkpoints (CPU, EP=2): profile -> plan-placement ->
apply-placement -> training with the plan. Re-placing experts does not change the model."""

import json

import pytest
import torch
from conftest import pretrain_cpu, pretrain_cpu_cmd, run_log_rows, train_losses

from megatron_moe_ext.cli import main

pytestmark = pytest.mark.dist


def _expert_fc1(ckpt_iter_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    reader = FileSystemReader(str(ckpt_iter_dir))
    size = reader.read_metadata().state_dict_metadata[key].size
    sd = {key: torch.empty(size)}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd[key]


def test_profile_plan_apply_and_train(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    pretrain_cpu(tmp_path, ckpt, tmp_path / "base.jsonl")

    # profile: evaluation batches of the trained checkpoint
    prof = tmp_path / "prof"
    cmd = pretrain_cpu_cmd(ckpt, tmp_path / "prof.jsonl")
    flags = cmd[cmd.index("--cpu") + 1:]
    assert main(["profile", "--cpu", "--nproc", "2", "--output", str(prof), "--", *flags]) == 0
    profile = json.loads((prof / "profile.json").read_text())
    assert profile["num_experts"] == 4 and set(profile["layers"]) == {"1", "2"}
    assert profile["tokens"] > 0

    # plan: the planned grouping keeps at least as much co-activation inside ranks as identity
    plan = tmp_path / "plan.json"
    assert main(["plan-placement", "--profile", str(prof), "--ep", "2", "--top-t", "1",
                 "--co-resident-only", "--output", str(plan)]) == 0
    p = json.loads(plan.read_text())
    for layer in p["layers"].values():
        assert layer["intra_rank_fraction"]["planned"] >= layer["intra_rank_fraction"]["identity"] - 1e-9
    assert main(["plan-placement", "--profile", str(prof), "--ep", "2", "--output", str(plan)]) == 2
    assert "exists" in capsys.readouterr().err

    # apply: expert e's weights now sit in slot expert_to_slot[e]; the input is untouched
    before = {f.name: f.stat().st_mtime for f in (ckpt / "iter_0000008").iterdir()}
    placed = tmp_path / "placed"
    assert main(["apply-placement", "--load", str(ckpt), "--plan", str(plan), "--save", str(placed)]) == 0
    assert before == {f.name: f.stat().st_mtime for f in (ckpt / "iter_0000008").iterdir()}
    old, new = _expert_fc1(ckpt / "iter_0000008"), _expert_fc1(placed / "iter_0000008")
    moved = False
    for layer, entry in p["layers"].items():
        slot = torch.tensor(entry["expert_to_slot"])
        moved |= not torch.equal(slot, torch.arange(4))
        assert torch.equal(new[int(layer) - 1][slot], old[int(layer) - 1])
    assert moved, "the planted plan should move some expert"
    assert main(["apply-placement", "--load", str(ckpt), "--plan", str(plan), "--save", str(placed)]) == 2
    assert "exists" in capsys.readouterr().err

    # Training on from both checkpoints (optimizer state moved too) gives the same losses.
    extra = ("--override-opt_param-scheduler",)
    pretrain_cpu(tmp_path, ckpt, tmp_path / "orig_more.jsonl", *extra, train_iters=10)
    pretrain_cpu(tmp_path, placed, tmp_path / "placed_more.jsonl", *extra, train_iters=10)
    a, b = train_losses(tmp_path / "orig_more.jsonl"), train_losses(tmp_path / "placed_more.jsonl")
    assert sorted(a) == sorted(b) == [9, 10]
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-6), it

    # C2R with the plan trains from the re-placed checkpoint; one co-resident partner (2 experts
    # per rank) keeps each token on one rank.
    c2r_log = tmp_path / "c2r.jsonl"
    pretrain_cpu(tmp_path, placed, c2r_log, *extra, "--moe-router-policy", "c2r",
                 "--moe-c2r-plan", str(plan), "--moe-dedup-dispatch", train_iters=12)
    rows = [r for r in run_log_rows(c2r_log) if r["kind"] == "train"]
    assert rows and all(r["moe_ext/rows_per_token"] == 1.0 for r in rows)

    # ... but not from a checkpoint whose experts were not moved by that plan.
    proc = pretrain_cpu(tmp_path, ckpt, tmp_path / "bad.jsonl", *extra, "--moe-router-policy",
                        "c2r", "--moe-c2r-plan", str(plan), train_iters=12, expect_rc=1)
    assert "apply-placement" in proc.stdout + proc.stderr
