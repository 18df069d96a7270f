"""Bad input never costs a run (issue 14): every refusal is one sentence before anything starts,
no traceback, and inputs are never modified. Fast checks (no training); the ones that need the
pretrain entry or a checkpoint are in tests/test_entry_hardening.py."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moe_ext.args import add_moe_ext_args, moe_ext_config_from_args
from megatron_moe_ext.cli import build_parser, main
from megatron_moe_ext.config import MoEExtConfig, MoEExtConfigError, flag_attr, flag_name

REPO = Path(__file__).resolve().parents[1]


def _parse(*flags, **megatron):
    args = add_moe_ext_args(argparse.ArgumentParser()).parse_args(list(flags))
    for k, v in {"num_experts": 8, "moe_router_topk": 2, "expert_model_parallel_size": 2,
                 "world_size": 2, **megatron}.items():
        setattr(args, k, v)
    return args


def _refused(*flags, **megatron) -> str:
    with pytest.raises(MoEExtConfigError) as err:
        moe_ext_config_from_args(_parse(*flags, **megatron), exit_on_error=False)
    msg = str(err.value)
    assert msg.endswith(".") and ". " not in msg, f"one sentence: {msg}"
    return msg


def _cli(capsys, *argv):
    """(exit code, stderr) of `megatron-moe-ext ARGV` in this process; never a traceback."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# --- 4: output paths at parse time -------------------------------------------------------------

def test_output_paths_of_the_wrong_kind_are_refused_at_parse_time(tmp_path):
    a_file, a_dir = tmp_path / "f", tmp_path / "d"
    a_file.write_text("x")
    a_dir.mkdir()
    assert "--save-routing-trace" in _refused("--save-routing-trace", str(a_file))
    assert "--moe-profile-collaboration" in _refused("--moe-profile-collaboration", str(a_file))
    assert "--moe-ext-run-log" in _refused("--moe-ext-run-log", str(a_dir))
    assert "--moe-ext-run-log" in _refused("--moe-ext-run-log", str(a_file / "log.jsonl"))
    # new paths below a writable folder are fine (created when first written)
    cfg = moe_ext_config_from_args(_parse("--moe-ext-run-log", str(tmp_path / "new" / "log.jsonl"),
                                          "--save-routing-trace", str(tmp_path / "tr"),
                                          "--moe-profile-collaboration", str(a_dir)))
    assert cfg.run_log and not (tmp_path / "new").exists()
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_below_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in _refused("--moe-ext-run-log", str(ro / "log.jsonl"))
    finally:
        ro.chmod(0o700)


# --- README: "a bad combination stops before anything starts", for every plugin flag ----------

def _bad_values(tmp_path):
    """A refused value for every plugin option that has one (bool switches have none), with the
    policy it needs; a new option without an entry here fails the coverage test below."""
    a_file, a_dir = tmp_path / "file", tmp_path / "dir"
    a_file.write_text("x")
    a_dir.mkdir(exist_ok=True)
    c2r, loc = ["--moe-router-policy", "c2r"], ["--moe-router-policy", "locmoe"]
    plus = ["--moe-router-policy", "locmoe-plus"]
    return {
        "router_policy": (["--moe-router-policy", "locmoe-plus"], {}),  # needs a capacity factor
        "router_kernel": (["--moe-router-kernel", "fused"], {"moe_router_score_function": "sigmoid"}),
        "ranks_per_node": (["--moe-ranks-per-node", "0"], {}),
        "ext_metrics_bytes_per_element": (["--moe-ext-metrics-bytes-per-element", "3"], {}),
        "run_log": (["--moe-ext-run-log", str(a_dir)], {}),
        "save_routing_trace": (["--save-routing-trace", str(a_file)], {}),
        "routing_trace_interval": (["--routing-trace-interval", "-1", "--save-routing-trace", str(a_dir)], {}),
        "routing_trace_max_tokens": (["--routing-trace-max-tokens", "0", "--save-routing-trace", str(a_dir)], {}),
        "c2r_top_t": (c2r + ["--moe-c2r-top-t", "0"], {}),
        "c2r_plan": (c2r + ["--moe-c2r-plan", str(a_file)], {}),
        "c2r_warmup_steps": (c2r + ["--moe-c2r-warmup-steps", "-1"], {}),
        "c2r_layout_ep": (c2r + ["--moe-c2r-layout-ep", "3"], {}),  # not a multiple of EP 2
        "profile_collaboration": (["--moe-profile-collaboration", str(a_file)], {}),
        "locmoe_mu": (loc + ["--moe-locmoe-mu", "nan"], {}),
        "locmoe_eps": (loc + ["--moe-locmoe-eps", "inf"], {}),
        "locmoe_layout_ep": (loc + ["--moe-locmoe-layout-ep", "8"], {}),   # the run has EP 2
        "locmoe_gate": (["--moe-locmoe-gate", "grap"], {}),  # locmoe only
        "locmoe_local_bias": (loc + ["--moe-locmoe-local-bias=-inf"], {}),
        "locmoe_local_bias_warmup_steps": (loc + ["--moe-locmoe-local-bias-warmup-steps", "5"], {}),
        "locmoe_capacity": (loc + ["--moe-locmoe-capacity", "bound"], {}),
        "locmoe_plus_tau": (plus + ["--moe-locmoe-plus-tau", "nan"], {"moe_expert_capacity_factor": 1.0}),
        "locmoe_plus_reestimate_interval": (plus + ["--moe-locmoe-plus-reestimate-interval", "-1"],
                                            {"moe_expert_capacity_factor": 1.0}),
        "expert_backend": (["--moe-expert-backend", "torch"], {"delay_wgrad_compute": True}),
        "scmoe": (["--moe-scmoe", "pos1"], {"num_experts": None}),
        "scmoe_expert_slot": (["--moe-scmoe-expert-slot", "2"], {}),
    }


def test_every_plugin_flag_has_a_parse_time_refusal(tmp_path):
    bad = _bad_values(tmp_path)
    fields = [f for f in dataclasses.fields(MoEExtConfig) if f.type not in (bool, "bool")]
    assert sorted(bad) == sorted(f.name for f in fields), "a plugin option without a refused value"
    for f in fields:
        flags, megatron = bad[f.name]
        msg = _refused(*flags, **megatron)
        assert flag_name(f) in msg, (f.name, msg)
        assert hasattr(_parse(), flag_attr(f))


def test_a_switch_without_its_backend_is_refused():
    assert "--moe-expert-backend torch" in _refused("--moe-ep1-host-splits")
    moe_ext_config_from_args(_parse("--moe-ep1-host-splits", "--moe-expert-backend", "torch"),
                             exit_on_error=False)


@pytest.mark.parametrize("flags,megatron,names", [
    (["--moe-router-policy", "c2r", "--moe-c2r-warmup-steps", "10"], {}, "--moe-c2r-warmup-steps"),
    (["--moe-router-policy", "locmoe", "--moe-locmoe-capacity", "bound"], {"moe_expert_capacity_factor": 1.25},
     "--moe-locmoe-capacity"),
    (["--moe-router-policy", "locmoe-plus"], {"moe_expert_capacity_factor": 1.0}, "--moe-locmoe-plus-reestimate-interval"),
    (["--moe-expert-backend", "torch"], {"fp8": "hybrid"}, "--moe-expert-backend torch"),
    (["--save-routing-trace", "DIR"], {}, "--save-routing-trace"),
])
def test_what_a_cuda_graph_would_freeze_is_refused(tmp_path, flags, megatron, names):
    """Host-side per-iteration state and hooks do not replay in a CUDA graph (mcore/iteration.py)."""
    flags = [str(tmp_path / "trace") if f == "DIR" else f for f in flags]
    msg = _refused(*flags, cuda_graph_impl="full_iteration", **megatron)
    assert names in msg and "--cuda-graph-impl full_iteration" in msg
    moe_ext_config_from_args(_parse(*flags, cuda_graph_impl="none", **megatron), exit_on_error=False)


def test_graph_safe_settings_pass_with_a_cuda_graph():
    for flags in (["--moe-router-policy", "c2r"], ["--moe-router-policy", "locmoe", "--moe-locmoe-local-bias", "0.5",
                                                   "--moe-locmoe-local-bias-warmup-steps", "5"],
                  ["--moe-expert-backend", "torch", "--moe-router-kernel", "fused"]):
        moe_ext_config_from_args(_parse(*flags, cuda_graph_impl="full_iteration"), exit_on_error=False)


# --- 5: NaN and inf in every verb's float flags -------------------------------------------------

# the arguments each verb with float flags needs besides the flag under test
_VERB_ARGS = {"prepare-data": lambda tmp: ["--output-dir", str(tmp / "data")], "comm-volume": lambda tmp: []}


def _float_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(verb, a.option_strings[0]) for verb, p in sub.choices.items()
            for a in p._actions if a.type is float]


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("verb, flag", _float_flags())
def test_verbs_refuse_non_finite_floats(tmp_path, capsys, verb, flag, value):
    from megatron_moe_ext.routing.policies import POLICIES

    assert verb in _VERB_ARGS, f"{verb} has float flags: add its arguments to _VERB_ARGS"
    extra = _VERB_ARGS[verb](tmp_path)
    owner = [p.name for p in POLICIES.values() for o in p.offline_options if f"--{o.flag}" == flag]
    if verb == "comm-volume" and owner:
        extra += ["--policy", owner[0], "--tokens", "64", "--experts", "8", "--ep", "2", "--topk", "2"]
    rc, err = _cli(capsys, verb, *extra, flag, value)
    assert rc == 2 and flag in err and "finite" in err, err
    assert not (tmp_path / "data").exists()


# --- 6: profile on a missing checkpoint --------------------------------------------------------

def test_profile_refuses_a_missing_checkpoint_before_launching(tmp_path, capsys):
    prof, missing, empty = tmp_path / "prof", tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    rc, err = _cli(capsys, "profile", "--cpu", "--output", str(prof), "--", "--num-layers", "2",
                   f"--load={missing}")
    assert rc == 2 and f"--load {missing} does not exist" in err, err
    rc, err = _cli(capsys, "profile", "--cpu", "--output", str(prof), "--", "--load", str(empty))
    assert rc == 2 and f"--load {empty} holds no Megatron checkpoint" in err, err
    assert not prof.exists()


# --- 11: tracebacks where a sentence belongs ---------------------------------------------------

def test_plot_metrics_output_in_a_missing_folder(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_text('{"kind": "train", "iteration": 1, "lm loss": 2.0}\n')
    rc, err = _cli(capsys, "plot-metrics", str(log), "--keys", "lm loss",
                   "--output", str(tmp_path / "missing" / "m.png"))
    assert rc == 2 and "--output" in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--experts", "3"], "--experts 3"),
    (["--topk", "9"], "--topk 9"),
    (["--experts", "0"], "--experts"),
    (["--router-policy", "bogus"], "--router-policy"),
])
def test_quickstart_checks_its_flags_before_preparing_data(tmp_path, capsys, flags, needle):
    out = tmp_path / "qs"
    rc, err = _cli(capsys, "quickstart", "--output-dir", str(out), *flags)
    assert rc == 2 and needle in err, err
    assert not out.exists(), "nothing prepared or created"


def test_quickstart_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "qs"
    f.write_text("keep")
    rc, err = _cli(capsys, "quickstart", "--output-dir", str(f))
    assert rc == 2 and "--output-dir" in err and "file" in err
    assert f.read_text() == "keep"


# --- 12: smaller ---------------------------------------------------------------------------------

def _profile(tmp_path) -> Path:
    import torch

    from megatron_moe_ext.files.plan import save_profile

    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 4, generator=g, dtype=torch.float64)
    save_profile(tmp_path / "prof", {1: m + m.T, 2: m @ m.T}, topk=2, tokens=100, metrics={})
    return tmp_path / "prof"


def test_plan_placement_overwrite_flag_exists_and_works(tmp_path, capsys):
    prof, plan = _profile(tmp_path), tmp_path / "plan.json"
    plan.write_text("old")
    rc, err = _cli(capsys, "plan-placement", "--profile", str(prof), "--ep", "2", "--output", str(plan))
    assert rc == 2 and "--overwrite" in err and plan.read_text() == "old"
    rc, _ = _cli(capsys, "plan-placement", "--profile", str(prof), "--ep", "2", "--output", str(plan),
                 "--overwrite")
    assert rc == 0 and plan.read_text() != "old"


def test_plot_metrics_writes_nothing_when_no_key_is_found(tmp_path, capsys):
    log, png = tmp_path / "run.jsonl", tmp_path / "m.png"
    log.write_text('{"kind": "train", "iteration": 1, "lm loss": 2.0}\n')
    rc, err = _cli(capsys, "plot-metrics", str(log), "--keys", "no such key", "--output", str(png))
    assert rc == 2 and "no such key" in err
    assert not png.exists()


def test_plot_metrics_names_an_unreadable_log(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_bytes(b"\xff\xfe\x00binary")  # not text
    rc, err = _cli(capsys, "plot-metrics", str(log), "--keys", "lm loss", "--output", str(tmp_path / "m.png"))
    assert rc == 2 and str(log) in err
    if os.geteuid() != 0:
        log.write_text('{"kind": "train", "iteration": 1, "lm loss": 2.0}\n')
        log.chmod(0)
        rc, err = _cli(capsys, "plot-metrics", str(log), "--keys", "lm loss", "--output", str(tmp_path / "m.png"))
        assert rc == 2 and str(log) in err and "cannot be read" in err
    assert not (tmp_path / "m.png").exists()


def test_cli_help_imports_no_torch_or_megatron():
    """`megatron-moe-ext --help` builds every verb's parser: none may import the heavy stack."""
    code = ("import sys, time; t = time.time(); from megatron_moe_ext.cli import build_parser; "
            "build_parser().format_help(); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'megatron', 'numpy', 'matplotlib', 'sentencepiece'}); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "[]"


def test_dev_names_a_too_old_moe_ext_python(tmp_path):
    """MOE_EXT_PYTHON is the user's choice: refused with its version, never silently replaced.
    PATH holds no pyenv, so nothing else is found or installed whatever the script does."""
    old = next((p for p in ("/usr/bin/python3.11", "/bin/python3.11") if os.path.exists(p)), None)
    if old is None:
        pytest.skip("no Python 3.11 here")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MOE_EXT_VENV": str(tmp_path / "venv"),
           "MOE_EXT_PYTHON": "python3.11"}
    proc = subprocess.run([str(REPO / "dev"), "comm-volume"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("dev: MOE_EXT_PYTHON=python3.11 is Python 3.11; megatron-core 0.19 "
                                   "needs >= 3.12.")
    assert not (tmp_path / "venv").exists()
