"""Plugin flags: every invalid option or combination fails with one sentence naming the flag."""

import argparse
import subprocess
import sys

import pytest

from megatron_moe_ext.args import add_moe_ext_args, moe_ext_config_from_args
from megatron_moe_ext.config import MoEExtConfig, MoEExtConfigError


def _parse(*flags, **megatron):
    parser = add_moe_ext_args(argparse.ArgumentParser())
    args = parser.parse_args(list(flags))
    for k, v in {"num_experts": 8, "moe_router_topk": 2, "expert_model_parallel_size": 2,
                 "world_size": 2, **megatron}.items():
        setattr(args, k, v)
    return args


def test_defaults_round_trip_from_flags():
    cfg = moe_ext_config_from_args(_parse())
    assert cfg == MoEExtConfig()
    cfg = moe_ext_config_from_args(_parse("--moe-ranks-per-node", "1", "--no-moe-ext-metrics",
                                          "--moe-ext-run-log", "x.jsonl"))
    assert (cfg.ranks_per_node, cfg.ext_metrics, cfg.run_log) == (1, False, "x.jsonl")


@pytest.mark.parametrize("flags, megatron, flag_named", [
    (["--moe-c2r-top-t", "3"], {}, "--moe-c2r-top-t"),
    (["--moe-router-policy", "c2r", "--moe-c2r-top-t", "0"], {"moe_router_topk": 2}, "--moe-c2r-top-t"),
    (["--moe-router-policy", "c2r"], {"num_experts": 4, "expert_model_parallel_size": 4}, "--moe-c2r-top-t"),
    (["--moe-router-policy", "c2r", "--moe-c2r-top-t", "8"], {}, "--moe-c2r-top-t"),
    (["--moe-router-policy", "c2r", "--moe-c2r-top-t", "5", "--moe-c2r-warmup-steps", "10"], {},
     "--moe-c2r-warmup-steps"),
    (["--moe-router-policy", "c2r", "--moe-c2r-warmup-steps", "-1"], {}, "--moe-c2r-warmup-steps"),
    (["--moe-router-policy", "c2r", "--moe-c2r-plan", "/nonexistent/plan.json"], {}, "--moe-c2r-plan"),
    (["--moe-dedup-dispatch"], {"moe_token_dispatcher_type": "allgather"}, "--moe-dedup-dispatch"),
    (["--moe-dedup-dispatch"], {"expert_tensor_parallel_size": 2}, "--expert-tensor-parallel-size"),
    # Megatron defaults expert TP to TP: the sentence says to set it to 1
    (["--moe-dedup-dispatch"], {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 2},
     "--expert-tensor-parallel-size 1"),
    (["--moe-expert-backend", "torch"], {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 2,
                                         "add_bias_linear": False}, "--expert-tensor-parallel-size 1"),
    # LocMoE pools D_c over a micro-batch's TP shards, which must share a node (one D_l)
    (["--moe-router-policy", "locmoe", "--moe-ranks-per-node", "1"],
     {"tensor_model_parallel_size": 2, "world_size": 4}, "--moe-ranks-per-node"),
    (["--moe-dedup-dispatch"], {"moe_shared_expert_overlap": True}, "--moe-shared-expert-overlap"),
    (["--moe-locmoe-mu", "0.1"], {}, "--moe-locmoe-mu"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-mu", "-1"], {}, "--moe-locmoe-mu"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-eps", "0"], {}, "--moe-locmoe-eps"),
    (["--moe-router-policy", "locmoe"], {"hidden_size": 100}, "--hidden-size"),
    (["--moe-locmoe-capacity", "bound"], {}, "--moe-locmoe-capacity"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias-warmup-steps", "10"], {},
     "--moe-locmoe-local-bias"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias", "0.5",
      "--moe-locmoe-local-bias-warmup-steps", "-1"], {}, "--moe-locmoe-local-bias-warmup-steps"),
    (["--moe-locmoe-plus-tau", "0.5"], {}, "--moe-locmoe-plus-tau"),
    (["--moe-router-policy", "locmoe-plus"], {}, "--moe-expert-capacity-factor"),
    (["--moe-router-policy", "locmoe-plus", "--moe-locmoe-plus-tau", "0"],
     {"moe_expert_capacity_factor": 1.0}, "--moe-locmoe-plus-tau"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-capacity", "bound"], {}, "--moe-expert-capacity-factor"),
    (["--moe-router-policy", "locmoe-plus"], {}, "--moe-router-policy"),
    (["--moe-ranks-per-node", "0"], {}, "--moe-ranks-per-node"),
    (["--moe-ranks-per-node", "3"], {"expert_model_parallel_size": 4}, "--moe-ranks-per-node"),
    (["--moe-ext-metrics-bytes-per-element", "3"], {}, "--moe-ext-metrics-bytes-per-element"),
    (["--moe-expert-backend", "torch"], {"delay_wgrad_compute": True}, "--delay-wgrad-compute"),
    (["--moe-expert-backend", "torch"], {"use_te_activation_func": True}, "--use-te-activation-func"),
    (["--routing-trace-interval", "5"], {}, "--save-routing-trace"),
    (["--routing-trace-interval", "-1", "--save-routing-trace", "d"], {}, "--routing-trace-interval"),
    (["--moe-dedup-dispatch"], {"transformer_impl": "inference_optimized"}, "--transformer-impl"),
    (["--moe-router-policy", "locmoe-plus"], {"moe_expert_capacity_factor": 1.0,
                                              "moe_enable_routing_replay": True}, "--moe-enable-routing-replay"),
    (["--moe-router-policy", "c2r"], {"moe_router_num_groups": 2, "moe_router_group_topk": 1},
     "--moe-router-num-groups"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-mu", "nan"], {}, "--moe-locmoe-mu"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias", "inf"], {}, "--moe-locmoe-local-bias"),
    (["--moe-scmoe", "pos1"], {"num_experts": None}, "--num-experts"),
])
def test_invalid_combinations_name_the_flag(flags, megatron, flag_named):
    with pytest.raises(MoEExtConfigError) as err:
        moe_ext_config_from_args(_parse(*flags, **megatron), exit_on_error=False)
    msg = str(err.value)
    assert flag_named in msg
    assert msg.count(". ") == 0 and msg.endswith("."), "one sentence"


def test_flags_are_generated_from_the_config_fields():
    """Each MoEExtConfig field is one flag whose help is the field's docstring."""
    import dataclasses

    from megatron_moe_ext.config import flag_attr, flag_name

    parser = add_moe_ext_args(argparse.ArgumentParser())
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(MoEExtConfig):
        a = actions[flag_attr(f)]
        assert flag_name(f) in a.option_strings
        assert a.default == f.default and a.help and a.help[0].isupper(), f.name
    assert actions["moe_router_policy"].choices == ("topk", "c2r", "locmoe", "locmoe-plus")
    assert "--no-moe-ext-metrics" in actions["moe_ext_metrics"].option_strings


def test_c2r_plan_mismatch_names_the_file(tmp_path):
    import torch

    from megatron_moe_ext.files.plan import Plan, save_plan
    from megatron_moe_ext.routing.collaboration import default_partner_lists
    from megatron_moe_ext.routing.topology import EPTopology

    path = save_plan(tmp_path / "plan.json", Plan(8, 2, 3, True, {1: torch.arange(8)},
                                                   {1: default_partner_lists(EPTopology(8, 2, 2), 3)}),
                     report={}, profile="-")
    ok = moe_ext_config_from_args(_parse("--moe-router-policy", "c2r", "--moe-c2r-plan", str(path)))
    assert ok.c2r_plan == str(path)
    for megatron, needle in (({"num_experts": 16}, "16"), ({"expert_model_parallel_size": 4}, "4"),
                             ({"moe_router_topk": 6}, "k-1 = 5")):
        with pytest.raises(MoEExtConfigError) as err:
            moe_ext_config_from_args(_parse("--moe-router-policy", "c2r", "--moe-c2r-plan",
                                            str(path), **megatron), exit_on_error=False)
        assert str(path) in str(err.value) and needle in str(err.value)


def test_ranks_per_node_falls_back_to_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert MoEExtConfig().resolved_ranks_per_node(world_size=8) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert MoEExtConfig().resolved_ranks_per_node(world_size=8) == 8
    assert MoEExtConfig(ranks_per_node=2).resolved_ranks_per_node(world_size=8) == 2


def test_pretrain_entry_rejects_bad_flags_before_training(tmp_path):
    """Through the real entry and Megatron's parser: exit 2 and one line naming the flag."""
    cmd = [sys.executable, "-m", "megatron_moe_ext.training.pretrain_gpt", "--cpu",
           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
           "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
           "--num-experts", "4", "--moe-router-topk", "2", "--mock-data",
           "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--train-iters", "1",
           "--moe-router-policy", "locmoe-plus", "--save", str(tmp_path / "ckpt"), "--save-interval", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"})
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(err_lines) == 1 and "--moe-expert-capacity-factor" in err_lines[0]
    assert not (tmp_path / "ckpt").exists()
