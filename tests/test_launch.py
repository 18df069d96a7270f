"""Launch templates and examples: their --dry-run output, run through Megatron's real parser.

Every Slurm template, launcher and example prints, under --dry-run, the exact commands it would run.
These tests run those dry-runs for several topologies (outside Slurm, with SLURM_* set by hand),
check the topology reached torchrun and the plugin, and parse the printed pretrain flags with
Megatron's own parser plus the plugin's flags (`parse_args(ignore_unknown_args=False)`), then
Megatron's `validate_args` with WORLD_SIZE set to the job's size, then the plugin's validation
(`moe_ext_config_from_args(exit_on_error=False)`). So an example cannot carry a flag the parser
rejects, nor a parallel layout Megatron refuses (world size divisible by TP x PP, EP dividing the
experts, global batch divisible by micro batch x DP), nor a plugin combination the plugin refuses.

Stood in on this CPU machine, so not checked here: `torch.cuda.get_device_capability()` (Megatron's
grouped-GEMM check) answers (9, 0), an H100/H200; `transformer_engine` counts as installed for the
plugin's `--moe-expert-backend te` check; Transformer Engine's own version checks see no TE. Not
checked at all: what happens after parsing (model build, spec-time ScMoE rules such as a pipeline
boundary between a dense block and its MoE block, memory, the data paths, the container image).

The requeue/retry loop of the Slurm template runs for real against stand-in `srun` and `scontrol`
commands on PATH.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launch" / "slurm_pretrain.sbatch"
LOCAL = REPO / "launch" / "torchrun_local.sh"
ENTRY = "megatron_moe_ext.training.pretrain_gpt"


def _load_hostlist():
    spec = importlib.util.spec_from_file_location("hostlist", REPO / "launch" / "hostlist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hostlist = _load_hostlist()


def _clean_env(**extra) -> dict:
    """The environment without any Slurm/launch variable of the machine running the tests."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "TORCH_NCCL_")) and k not in (
               "MASTER_ADDR", "MASTER_PORT", "CLUSTER_CONFIG", "CONTAINER_IMAGE", "VENV", "PYTHON",
               "SETUP_CMD", "MODEL_ARGS", "DATA_ARGS", "TRAIN_ARGS", "PLUGIN_ARGS", "EXTRA_ARGS",
               "RUN_NAME", "OUTPUT_DIR", "CKPT_DIR", "WANDB_PROJECT", "NNODES", "GPUS_PER_NODE",
               "EXPERT_BACKEND", "FP8", "ROUTER_PADDING", "RETRIES", "REQUEUE", "NPROC", "WORK_DIR",
               "STEPS", "HF_DIR", "REPO_DIR", "OUT")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dry_run(script, *args, **env) -> str:
    """stdout of `bash script --dry-run args...`; fails the test unless it exits 0."""
    p = subprocess.run(["bash", str(script), "--dry-run", *args], cwd=REPO, env=_clean_env(**env),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{script} --dry-run exited {p.returncode}: {p.stderr}"
    return p.stdout


def slurm(nodelist: str, nnodes: int, gpus) -> dict:
    return {"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": nnodes, "SLURM_GPUS_PER_NODE": gpus}


def command_line(out: str, needle: str = ENTRY) -> list:
    lines = [line for line in out.splitlines() if needle in line and not line.startswith("#")]
    assert len(lines) == 1, f"expected one command with {needle!r}, got {len(lines)}:\n{out}"
    return shlex.split(lines[0])


def torchrun_options(words: list) -> dict:
    """torchrun's own options (before `-m ENTRY`) as a dict."""
    start = words.index("torch.distributed.run") + 1
    end = words.index(ENTRY) - 1
    opts, it = {}, iter(words[start:end])
    for w in it:
        opts[w] = next(it)
    return opts


def pretrain_flags(words: list) -> list:
    return words[words.index(ENTRY) + 1:]


def last_value(flags: list, flag: str):
    values = [flags[i + 1] for i, f in enumerate(flags) if f == flag]
    return values[-1] if values else None


# --- Megatron's parser ------------------------------------------------------------------------

def megatron_parse(flags: list, world_size: int):
    """Megatron's parse_args + validate_args (WORLD_SIZE = world_size) and the plugin's validation.
    Returns (Megatron args, MoEExtConfig); raises what they raise."""
    from megatron.training.arguments import parse_args, validate_args

    from megatron_moe_ext.args import moe_ext_config_from_args
    from megatron_moe_ext.compat.presets import CPU_MEGATRON_FLAGS
    from megatron_moe_ext.training.plugin import extra_args_provider

    if "--cpu" in flags:  # what the entry does with its one entry-only flag
        flags = CPU_MEGATRON_FLAGS + [f for f in flags if f != "--cpu"]
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return object() if name == "transformer_engine" else real_find_spec(name, *a, **k)

    env = {"WORLD_SIZE": str(world_size), "RANK": "0"}
    with mock.patch.object(sys, "argv", ["pretrain_gpt.py", *flags]), \
            mock.patch.dict(os.environ, env), \
            mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), \
            mock.patch("importlib.util.find_spec", side_effect=find_spec), \
            contextlib.redirect_stdout(io.StringIO()):
        args = parse_args(extra_args_provider=extra_args_provider(), ignore_unknown_args=False)
        validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        cfg = moe_ext_config_from_args(args, exit_on_error=False)
    return args, cfg


# --- hostlist ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,hosts", [
    ("gpu[01-02]", ["gpu01", "gpu02"]),
    ("gpu01", ["gpu01"]),
    ("gpu[08-10,12]", ["gpu08", "gpu09", "gpu10", "gpu12"]),
    ("a[1-2]-ib[3-4],login1", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4", "login1"]),
    ("n[1,3],m[098-100]", ["n1", "n3", "m098", "m099", "m100"]),
])
def test_hostlist_expands_like_slurm(text, hosts):
    assert hostlist.expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu]1", "gpu[a-b]", "gpu[3-1]", "", "gpu[[1]]"])
def test_hostlist_refuses_bad_syntax(bad):
    with pytest.raises(hostlist.HostlistError):
        hostlist.expand_hostlist(bad)


def test_hostlist_cli():
    p = subprocess.run([sys.executable, str(REPO / "launch" / "hostlist.py"), "--first", "x[7-9]"],
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (0, "x7\n")
    p = subprocess.run([sys.executable, str(REPO / "launch" / "hostlist.py"), "x[7-"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unbalanced" in p.stderr


# --- the Slurm template -----------------------------------------------------------------------

def test_template_issue_example():
    """The issue's command: two nodes of 8 GPUs, outside Slurm."""
    out = dry_run(TEMPLATE, **slurm("gpu[01-02]", 2, 8))
    words = command_line(out)
    line = next(line for line in out.splitlines() if ENTRY in line)
    assert "--nnodes 2 --nproc-per-node 8" in line
    opts = torchrun_options(words)
    assert opts["--rdzv-endpoint"] == "gpu01:29500" and opts["--rdzv-backend"] == "c10d"
    flags = pretrain_flags(words)
    assert last_value(flags, "--moe-ranks-per-node") == "8"
    assert words[:3] == ["srun", "--nodes", "2"]
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out


@pytest.mark.parametrize("nodelist,nnodes,gpus,first,per_node", [
    ("gpu01", 1, 8, "gpu01", 8),
    ("a[1-2]-ib[1-2]", 4, "h100:4", "a1-ib1", 4),      # typed GPUs: SLURM_GPUS_PER_NODE=h100:4
    ("node[098-101]", 4, 8, "node098", 8),
])
def test_template_topologies(nodelist, nnodes, gpus, first, per_node):
    words = command_line(dry_run(TEMPLATE, **slurm(nodelist, nnodes, gpus)))
    opts = torchrun_options(words)
    assert (opts["--nnodes"], opts["--nproc-per-node"]) == (str(nnodes), str(per_node))
    assert opts["--rdzv-endpoint"] == f"{first}:29500"
    assert last_value(pretrain_flags(words), "--moe-ranks-per-node") == str(per_node)


def test_template_default_flags_pass_megatron_and_plugin():
    words = command_line(dry_run(TEMPLATE, **slurm("gpu[01-02]", 2, 8)))
    args, cfg = megatron_parse(pretrain_flags(words), world_size=16)
    assert args.expert_model_parallel_size == 8 and args.data_parallel_size == 16
    assert cfg.ranks_per_node == 8 and cfg.router_policy == "topk"
    assert args.save == args.load == "runs/moe-ext/checkpoints"
    assert args.exit_signal_handler and args.tensorboard_dir == "runs/moe-ext/tensorboard"


def test_template_paths_wandb_and_flag_overrides(tmp_path):
    out = dry_run(TEMPLATE, "--moe-ranks-per-node", "4", "--lr", "1e-4",
                  RUN_NAME="exp1", OUTPUT_DIR=tmp_path / "o", WANDB_PROJECT="proj", MASTER_PORT=6000,
                  **slurm("gpu[01-02]", 2, 8))
    flags = pretrain_flags(command_line(out))
    assert flags.count("--moe-ranks-per-node") == 1 and last_value(flags, "--moe-ranks-per-node") == "4"
    assert last_value(flags, "--lr") == "1e-4"                           # later flags win in argparse
    assert last_value(flags, "--save") == str(tmp_path / "o" / "checkpoints")
    assert last_value(flags, "--wandb-project") == "proj" and last_value(flags, "--wandb-exp-name") == "exp1"
    assert "gpu01:6000" in out
    assert not (tmp_path / "o").exists()                                  # a dry run creates nothing


def test_template_keeps_a_ranks_per_node_given_with_equals():
    flags = pretrain_flags(command_line(dry_run(TEMPLATE, "--moe-ranks-per-node=4", **slurm("g[1-2]", 2, 8))))
    assert "--moe-ranks-per-node=4" in flags and "--moe-ranks-per-node" not in flags


def test_template_container_venv_and_setup_hooks(tmp_path):
    words = command_line(dry_run(TEMPLATE, CONTAINER_IMAGE="/img/moe.sqsh", **slurm("g[1-2]", 2, 8)))
    i = words.index("--container-image")
    assert words[i + 1] == "/img/moe.sqsh"
    assert words[words.index("--container-workdir") + 1] == "/workspace/megatron-moe-ext"
    assert words[words.index("--container-mounts") + 1] == f"{REPO}:/workspace/megatron-moe-ext"
    words = command_line(dry_run(TEMPLATE, VENV="/shared/venv", **slurm("g[1-2]", 2, 8)))
    assert "/shared/venv/bin/python" in words and "--container-image" not in words
    words = command_line(dry_run(TEMPLATE, SETUP_CMD="pip install -q -e .", **slurm("g[1-2]", 2, 8)))
    i = words.index("-c")
    assert words[i - 1] == "bash" and words[i + 1] == 'pip install -q -e . && exec "$@"'
    assert words[i + 2] == "bash" and words[i + 3] == "python3"           # $0, then the torchrun command


def test_template_cluster_config(tmp_path):
    cfg = tmp_path / "cluster.env"
    cfg.write_text(': "${CONTAINER_IMAGE:=nvcr.io#nvidia/pytorch:25.10-py3}"\n'
                   'export NCCL_IB_HCA=mlx5_0,mlx5_1\n: "${RUN_NAME:=from-config}"\n')
    out = dry_run(TEMPLATE, CLUSTER_CONFIG=cfg, **slurm("g[1-2]", 2, 8))
    assert "export NCCL_IB_HCA=mlx5_0\\,mlx5_1" in out or "export NCCL_IB_HCA=mlx5_0,mlx5_1" in out
    words = command_line(out)
    assert words[words.index("--container-image") + 1] == "nvcr.io#nvidia/pytorch:25.10-py3"
    assert last_value(pretrain_flags(words), "--save") == "runs/from-config/checkpoints"
    out = dry_run(TEMPLATE, CLUSTER_CONFIG=cfg, RUN_NAME="cli-wins", **slurm("g[1-2]", 2, 8))
    assert last_value(pretrain_flags(command_line(out)), "--save") == "runs/cli-wins/checkpoints"


def test_template_without_nodelist_says_what_to_set():
    p = subprocess.run(["bash", str(TEMPLATE), "--dry-run"], cwd=REPO, env=_clean_env(),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "SLURM_JOB_NODELIST" in p.stderr and p.stdout == ""


def _fake_slurm(tmp_path: Path, srun_body: str) -> dict:
    """Stand-in srun/scontrol on PATH recording their calls in tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\n"
                                  f'echo "srun $*" >> {tmp_path}/calls\n' + srun_body)
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1 $2" = "show hostnames" ]; then seq -f "fakehost%g" 1 5000; exit 0; fi\n'
        f'echo "scontrol $*" >> {tmp_path}/calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "OUTPUT_DIR": tmp_path / "run",
            **slurm("gpu[01-02]", 2, 8)}


def test_template_retries_a_failed_run_then_stops(tmp_path):
    # fails twice, then succeeds: RETRIES=2 gets there, RETRIES=1 gives up with srun's exit code
    counter = tmp_path / "n"
    body = (f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}\n'
            '[ "$n" -ge 3 ] && exit 0; exit 7\n')
    env = _fake_slurm(tmp_path, body)
    p = subprocess.run(["bash", str(TEMPLATE)], cwd=REPO, env=_clean_env(RETRIES=2, **env),
                       capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert p.returncode == 0 and len(calls) == 3, p.stderr
    assert "--rdzv-endpoint fakehost1:29500" in calls[0] and "--rdzv-id 4242" in calls[0]
    assert (tmp_path / "run" / "logs").is_dir()
    counter.unlink()
    (tmp_path / "calls").unlink()
    p = subprocess.run(["bash", str(TEMPLATE)], cwd=REPO, env=_clean_env(RETRIES=1, **env),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 7 and len((tmp_path / "calls").read_text().splitlines()) == 2
    assert "failed (exit 7) after 2 attempt(s)" in p.stderr


def test_template_requeues_on_usr1_after_megatron_saved(tmp_path):
    # srun stands in for Megatron: on SIGTERM it "saves" (writes a file) and exits 0
    body = (f'trap \'echo saved > {tmp_path}/saved; exit 0\' TERM\n'
            f'touch {tmp_path}/started\n'
            'for _ in $(seq 200); do sleep 0.1; done\nexit 3\n')
    env = _fake_slurm(tmp_path, body)
    proc = subprocess.Popen(["bash", str(TEMPLATE)], cwd=REPO, env=_clean_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "saved").read_text() == "saved\n"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-1] == "scontrol requeue 4242" and sum(c.startswith("srun") for c in calls) == 1


# --- the local launcher -----------------------------------------------------------------------

def test_local_launcher_dry_run_passes_flags_through():
    out = dry_run(LOCAL, "--nproc", "4", "--moe-layer-freq", "[0,1,0,1]", "--data-path", "a b")
    words = command_line(out)
    assert torchrun_options(words)["--nproc-per-node"] == "4"
    assert pretrain_flags(words) == ["--moe-layer-freq", "[0,1,0,1]", "--data-path", "a b"]
    out = dry_run(LOCAL, NPROC=3, MASTER_PORT=29600)
    opts = torchrun_options(command_line(out))
    assert (opts["--nproc-per-node"], opts["--master-port"]) == ("3", "29600")


def test_local_launcher_refuses_a_bad_nproc():
    p = subprocess.run(["bash", str(LOCAL), "--dry-run", "--nproc", "two"], cwd=REPO, env=_clean_env(),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--nproc must be a whole number" in p.stderr


# --- the example configurations ---------------------------------------------------------------

EXAMPLES = {
    # name: (default nodes, GPUs per node, what the plugin must see)
    "qwen3_30b_a3b_c2r.sh": (2, 8, dict(router_policy="c2r", dedup_dispatch=True, c2r_warmup_steps=200)),
    "mixtral_locmoe.sh": (2, 4, dict(router_policy="locmoe", locmoe_local_bias=0.6,
                                     locmoe_local_bias_warmup_steps=100)),
    "gpt_scmoe_pos2.sh": (2, 8, dict(router_policy="topk", scmoe="pos2")),
}


@pytest.mark.parametrize("backend", ["torch", "te"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_fp8_backends_pass_megatron_and_plugin(name, backend):
    nodes, gpus, want = EXAMPLES[name]
    out = dry_run(REPO / "examples" / name, EXPERT_BACKEND=backend)
    words = command_line(out)
    opts = torchrun_options(words)
    assert (opts["--nnodes"], opts["--nproc-per-node"]) == (str(nodes), str(gpus))
    args, cfg = megatron_parse(pretrain_flags(words), world_size=nodes * gpus)
    for key, value in want.items():
        assert getattr(cfg, key) == value, key
    assert cfg.expert_backend == backend and cfg.ranks_per_node == gpus
    assert args.fp8 == "hybrid" and args.fp8_recipe == "tensorwise"
    if name == "mixtral_locmoe.sh":  # EP spans the nodes: the locality router has something to save
        assert args.expert_model_parallel_size > gpus
        assert args.moe_router_padding_for_quantization == (backend == "te")


@pytest.mark.parametrize("name,nodelist,nnodes,gpus", [
    ("qwen3_30b_a3b_c2r.sh", "gpu[01-04]", 4, 8),        # more nodes: DP grows, EP stays in a node
    ("mixtral_locmoe.sh", "gb[1-4]", 4, 4),
    ("gpt_scmoe_pos2.sh", "gpu[01-04]", 4, 8),
])
def test_example_other_topology_and_bf16(name, nodelist, nnodes, gpus):
    words = command_line(dry_run(REPO / "examples" / name, FP8=0, **slurm(nodelist, nnodes, gpus)))
    assert torchrun_options(words)["--nnodes"] == str(nnodes)
    args, cfg = megatron_parse(pretrain_flags(words), world_size=nnodes * gpus)
    assert args.fp8 is None and cfg.ranks_per_node == gpus


def _slurm_examples():
    return sorted(p.name for p in (REPO / "examples").glob("*.sh")
                  if re.search(r"^run_example \d+ \d+", p.read_text(), re.M))


def test_the_three_model_examples_hand_over_to_the_template():
    assert set(EXAMPLES) <= set(_slurm_examples())


@pytest.mark.parametrize("name", _slurm_examples())
def test_every_slurm_example_parses(name):
    """Every example that hands over to the Slurm template (a user's copy saved under examples/
    included), on its own topology and defaults."""
    words = command_line(dry_run(REPO / "examples" / name))
    opts = torchrun_options(words)
    megatron_parse(pretrain_flags(words), world_size=int(opts["--nnodes"]) * int(opts["--nproc-per-node"]))


def test_example_runs_from_slurms_spool_copy(tmp_path):
    """sbatch runs a copy of the script from its spool folder: the repository is then found
    through SLURM_SUBMIT_DIR (submitted from the repository root), here from another cwd."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    for script in (REPO / "examples" / "mixtral_locmoe.sh", TEMPLATE):
        shutil.copy(script, copy)
        p = subprocess.run(["bash", str(copy), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                           env=_clean_env(SLURM_SUBMIT_DIR=REPO, **slurm("gpu[01-02]", 2, 4)))
        assert p.returncode == 0, p.stderr
        words = command_line(p.stdout)
        assert words[words.index("--chdir") + 1] == str(REPO)


def test_example_refuses_an_unknown_backend():
    p = subprocess.run(["bash", str(REPO / "examples" / "qwen3_30b_a3b_c2r.sh"), "--dry-run"], cwd=REPO,
                       env=_clean_env(EXPERT_BACKEND="cutlass"), capture_output=True, text=True)
    assert p.returncode == 2 and "EXPERT_BACKEND must be te or torch" in p.stderr


def test_example_with_a_flag_the_parser_rejects_fails():
    """The check above can fail: a misspelt flag passed to an example stops Megatron's parser."""
    words = command_line(dry_run(REPO / "examples" / "gpt_scmoe_pos2.sh", "--moe-scmoe-slot", "2"))
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        megatron_parse(pretrain_flags(words), world_size=16)


def test_example_plugin_refusal_is_caught():
    """... and so does a combination the plugin refuses (dedup with router padding)."""
    from megatron_moe_ext.config import MoEExtConfigError

    words = command_line(dry_run(REPO / "examples" / "qwen3_30b_a3b_c2r.sh", EXPERT_BACKEND="te",
                                 ROUTER_PADDING=1))
    with pytest.raises(MoEExtConfigError, match="--moe-dedup-dispatch does not support"):
        megatron_parse(pretrain_flags(words), world_size=16)


def test_example_scmoe_layer_pattern_refusal_is_caught():
    """pos2 on every-layer MoE (a later --moe-layer-freq 1 wins) is refused at parse time."""
    from megatron_moe_ext.config import MoEExtConfigError

    words = command_line(dry_run(REPO / "examples" / "gpt_scmoe_pos2.sh", "--moe-layer-freq", "1"))
    with pytest.raises(MoEExtConfigError, match="use --moe-scmoe pos1 for every-layer MoE"):
        megatron_parse(pretrain_flags(words), world_size=16)


# --- the C2R fine-tuning workflow -------------------------------------------------------------

WORKFLOW = REPO / "examples" / "c2r_finetune_workflow.sh"
STEPS = ["import-hf", "profile", "plan-placement", "apply-placement", "train", "export-hf"]


def _steps(out: str) -> dict:
    lines = out.splitlines()
    return {line.split()[2]: shlex.split(lines[i + 1]) for i, line in enumerate(lines)
            if line.startswith("# step ") and len(line.split()) == 3}


def test_workflow_dry_run_prints_the_six_steps_in_order(tmp_path):
    out = dry_run(WORKFLOW, WORK_DIR=tmp_path / "w")
    steps = _steps(out)
    assert list(steps) == STEPS
    assert steps["import-hf"][1:] == ["import-hf", "--hf", "/path/to/hf-model", "--out", str(tmp_path / "w/base"),
                                      "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                                      "--expert-model-parallel-size", "8"]
    assert steps["export-hf"][1:] == ["export-hf", "--load", str(tmp_path / "w/c2r"), "--out",
                                      str(tmp_path / "w/hf"), "--dtype", "bf16", "--routing", "native"]
    assert not (tmp_path / "w").exists()
    p = subprocess.run(["bash", str(WORKFLOW)], cwd=REPO, env=_clean_env(WORK_DIR=tmp_path / "w"),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "set HF_DIR" in p.stderr


def test_workflow_commands_pass_their_parsers(tmp_path):
    """With import-hf's flags file and a real plan in place, profile and train parse (Megatron and
    the plugin, the plan loaded and checked against the model), and the CLI verbs parse."""
    import torch

    from megatron_moe_ext.cli import build_parser, main
    from megatron_moe_ext.files.plan import save_profile

    work = tmp_path / "w"
    (work / "base").mkdir(parents=True)
    (work / "base" / "megatron_flags.txt").write_text(
        "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --ffn-hidden-size 1024 --seq-length 1024 "
        "--max-position-embeddings 1024 --normalization RMSNorm --swiglu --position-embedding-type rope "
        "--disable-bias-linear --untie-embeddings-and-output-weights --num-experts 16 --moe-router-topk 2 "
        "--moe-ffn-hidden-size 256 --moe-token-dispatcher-type alltoall --vocab-size 32000 --bf16\n")
    coact = {layer: torch.rand(16, 16) for layer in range(1, 5)}
    save_profile(work / "profile", {k: (c + c.T) for k, c in coact.items()}, topk=2, tokens=1000, metrics={})
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plan-placement", "--profile", str(work / "profile"), "--ep", "8", "--co-resident-only",
                     "--output", str(work / "plan.json")]) == 0
    steps = _steps(dry_run(WORKFLOW, WORK_DIR=work, EP=8, NPROC=8))
    assert list(steps) == STEPS
    # the CLI's own parsers
    for verb in ("import-hf", "plan-placement", "apply-placement", "export-hf"):
        build_parser().parse_args(steps[verb][1:])
    profile = steps["profile"]
    profile_flags = profile[profile.index("--") + 1:] + ["--skip-train", "--no-load-optim", "--no-load-rng"]
    args, _ = megatron_parse(profile_flags, world_size=8)
    assert args.load == str(work / "base") and args.skip_train
    train = steps["train"]
    flags = train[train.index("--nproc") + 2:]
    args, cfg = megatron_parse(flags, world_size=8)
    assert cfg.router_policy == "c2r" and cfg.c2r_plan == str(work / "plan.json") and cfg.dedup_dispatch
    assert args.pretrained_checkpoint == str(work / "placed") and args.load == args.save == str(work / "c2r")


def test_workflow_train_through_the_slurm_template(tmp_path):
    work = tmp_path / "w"
    (work / "base").mkdir(parents=True)
    (work / "base" / "megatron_flags.txt").write_text("--num-layers 2 --num-experts 8\n")
    out = dry_run(WORKFLOW, WORK_DIR=work, STEPS="train", TRAIN_LAUNCHER="slurm", **slurm("gpu[01-02]", 2, 8))
    flags = pretrain_flags(command_line(out))
    assert last_value(flags, "--num-layers") == "2" and flags.count("--num-layers") == 1
    assert "--vocab-size" not in flags and "--expert-model-parallel-size" in flags   # not the template's model
    assert flags.count("--global-batch-size") == 1 and last_value(flags, "--global-batch-size") == "64"
    assert last_value(flags, "--moe-router-policy") == "c2r" and last_value(flags, "--load") == str(work / "c2r")
    assert last_value(flags, "--moe-ranks-per-node") == "8"


# --- the CPU studies and the tiny CPU example -------------------------------------------------

@pytest.mark.parametrize("study,runs", [("study_c2r_cpu.sh", 6), ("study_locmoe_cpu.sh", 20),
                                        ("study_scmoe_cpu.sh", 4)])
def test_study_dry_runs_pass_the_quickstart_and_megatron_parsers(study, runs):
    from megatron_moe_ext.cli import build_parser
    from megatron_moe_ext.training.quickstart import quickstart_flags

    out = dry_run(REPO / "examples" / study)
    lines = [shlex.split(line) for line in out.splitlines() if " quickstart " in line]
    assert len(lines) == runs
    parser = build_parser()
    for words in lines:
        ns = parser.parse_args(words[1:])
        flags = quickstart_flags(["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096"],
                                 Path(ns.output_dir), train_iters=ns.train_iters, nproc=ns.nproc,
                                 experts=ns.experts, topk=ns.topk, router_policy=ns.router_policy,
                                 on_gpu=False) + list(ns.extra)
        megatron_parse(flags, world_size=ns.nproc)
    for words in (shlex.split(line) for line in out.splitlines() if " comm-volume " in line or " plot-metrics " in line):
        parser.parse_args(words[1:])


def test_tiny_cpu_dry_run_passes_megatron(tmp_path):
    out = dry_run(REPO / "examples" / "tiny_cpu.sh", OUT=tmp_path / "tiny")
    assert f"prepare-data --output-dir {tmp_path / 'tiny' / 'data'}" in out
    flags = pretrain_flags(command_line(out))
    placeholder = [f for f in flags if f.startswith("<data flags")]
    assert len(placeholder) == 1                                          # the data does not exist yet
    i = flags.index(placeholder[0])
    flags[i:i + 1] = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096"]
    args, cfg = megatron_parse(flags, world_size=2)
    assert args.expert_model_parallel_size == 2 and cfg.ranks_per_node == 1


# --- shellcheck ---------------------------------------------------------------------------------

def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for d in ("launch", "examples") for p in (REPO / d).iterdir()
                     if p.suffix in (".sh", ".sbatch", ".env"))
    assert len(scripts) >= 10
    p = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
