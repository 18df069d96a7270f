"""Command-line flags for Megatron's `extra_args_provider`, and Megatron args -> MoEExtConfig.

Usage with Megatron-LM's flow:

    args = parse_and_validate_args(extra_args_provider=add_moe_ext_args)
    ext_cfg = moe_ext_config_from_args(args)   # exits with one sentence on a bad combination

The flags are generated from `MoEExtConfig`'s fields with Megatron's own `ArgumentGroupFactory`
(name, type, default, choices, and the field's docstring as help), so each exists once. After
the config validates itself (pure checks), `check_with_megatron` runs the checks that need
Megatron's settings: each routing policy's and each adapter's, from the module that owns them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from typing import Any, Optional

from megatron_moe_ext.config import MoEExtConfig, MoEExtConfigError, flag_attr, flag_name
from megatron_moe_ext.errors import UserError


def _flag_factory():
    from megatron.training.argument_utils import ArgumentGroupFactory

    class FlagFactory(ArgumentGroupFactory):
        """Megatron's factory with the plugin's flag names (`flag_attr`) and on/off booleans."""

        def _build_argparse_kwargs_from_field(self, attribute):
            kwargs = super()._build_argparse_kwargs_from_field(attribute)
            kwargs["arg_names"] = [flag_name(attribute)]
            kwargs["dest"] = flag_attr(attribute)
            if attribute.type is bool and attribute.default is True:
                kwargs["action"] = argparse.BooleanOptionalAction  # --x / --no-x
            return kwargs

    return FlagFactory(MoEExtConfig)


def add_moe_ext_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flags to `parser` (Megatron's `extra_args_provider` signature)."""
    _flag_factory().build_group(parser, title="megatron-moe-ext")
    return parser


def moe_ext_config_from_args(args: argparse.Namespace, *, exit_on_error: bool = True) -> MoEExtConfig:
    """Build and validate the plugin config from Megatron's parsed args.

    On an invalid option this prints one sentence naming the flag and exits with status 2, as
    argparse does, unless `exit_on_error=False`, in which case MoEExtConfigError propagates.
    """
    kwargs = {f.name: getattr(args, flag_attr(f)) for f in dataclasses.fields(MoEExtConfig)
              if hasattr(args, flag_attr(f))}
    try:
        cfg = MoEExtConfig(**kwargs)
        check_with_megatron(cfg, args)
        check_paths(cfg, args)
    except UserError as e:
        if not exit_on_error:
            raise
        exit_with(e)
    return cfg


def exit_with(error: Exception, prog: str = "megatron-moe-ext") -> None:
    """Print `prog: error: <sentence>` on stderr and exit 2, as argparse does."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2)


def check_with_megatron(cfg: MoEExtConfig, a: Any) -> None:
    """The checks that need Megatron's settings (`a`: its args; TransformerConfig attribute names).
    Raises MoEExtConfigError with one sentence naming the flags."""
    num_experts = getattr(a, "num_experts", None)
    topk = getattr(a, "moe_router_topk", 2)
    ep = getattr(a, "expert_model_parallel_size", 1) or 1
    world = getattr(a, "world_size", 1) or 1
    rpn = cfg.resolved_ranks_per_node(world)
    if cfg.ranks_per_node is not None and ep % rpn != 0 and rpn % ep != 0:
        raise MoEExtConfigError(
            f"--moe-ranks-per-node {rpn} and --expert-model-parallel-size {ep} do not tile: "
            "one must divide the other so that EP ranks map onto whole nodes.")
    if num_experts is None and (cfg.router_policy != "topk" or cfg.scmoe != "off"):
        what = f"--moe-router-policy {cfg.router_policy}" if cfg.router_policy != "topk" else f"--moe-scmoe {cfg.scmoe}"
        raise MoEExtConfigError(f"{what} needs an MoE model; set --num-experts.")
    if num_experts is None:
        return
    from megatron_moe_ext.mcore.router import policy_router_problem
    from megatron_moe_ext.routing.topology import EPTopology

    problems = []
    if cfg.router_policy != "topk" or cfg.scmoe == "dgmoe":  # a PolicyRouter will be built
        problems.append(policy_router_problem(a, cfg.router_policy))
    if cfg.router_policy == "c2r":
        layout = cfg.c2r_layout_ep
        if layout is not None and (layout % ep or num_experts % layout):
            raise MoEExtConfigError(
                f"--moe-c2r-layout-ep {layout} must be a multiple of --expert-model-parallel-size {ep} "
                f"and divide --num-experts {num_experts}.")
        _check_c2r(cfg, EPTopology(num_experts, layout or ep, layout or ep), topk)
    if cfg.router_policy in ("locmoe", "locmoe-plus"):
        _check_locmoe(cfg, a, num_experts, ep, rpn)
    if cfg.router_kernel == "fused":
        problems.append(fused_router_problem(cfg, a))
    if cfg.dedup_dispatch:
        from megatron_moe_ext.mcore.dispatch import dedup_problem

        problems.append(dedup_problem(a))
    if cfg.scmoe != "off":
        from megatron_moe_ext.mcore.scmoe_spec import scmoe_problem

        problems.append(scmoe_problem(cfg.scmoe, a, topk))
    from megatron_moe_ext.mcore.iteration import cuda_graph_problem

    problems.append(cuda_graph_problem(cfg, getattr(a, "cuda_graph_impl", "none"), bool(getattr(a, "fp8", None))))
    if cfg.ep1_host_splits and cfg.expert_backend != "torch":
        problems.append("--moe-ep1-host-splits chooses the dispatcher of --moe-expert-backend torch "
                        "on one EP rank (other experts always split on the host); add "
                        "--moe-expert-backend torch or drop --moe-ep1-host-splits.")
    if cfg.expert_backend is not None:
        from megatron_moe_ext.experts import expert_backend_problem

        problems.append(expert_backend_problem(cfg.expert_backend, a))
    for problem in problems:
        if problem:
            raise MoEExtConfigError(problem)


def check_paths(cfg: MoEExtConfig, a: Any = None) -> None:
    """Output paths writable and inputs consistent before anything starts: a path found unusable
    when first written (after the last iteration, at the final save) loses the run. `a`: Megatron's
    args, for --load / --finetune."""
    _check_output(cfg.run_log, flag="--moe-ext-run-log", kind="file")
    _check_output(cfg.save_routing_trace, flag="--save-routing-trace", kind="folder")
    _check_output(cfg.profile_collaboration, flag="--moe-profile-collaboration", kind="folder")
    if cfg.profile_collaboration and os.path.exists(os.path.join(cfg.profile_collaboration, "profile.json")):
        raise MoEExtConfigError(
            f"--moe-profile-collaboration {cfg.profile_collaboration} already holds a profile.json; "
            "choose an empty folder so that no profile is overwritten.")
    load = getattr(a, "load", None)
    if not load or not os.path.exists(os.path.join(load, "latest_checkpointed_iteration.txt")):
        return  # nothing is loaded: Megatron starts from scratch
    if cfg.c2r_plan:
        from megatron_moe_ext.files.plan import check_plan_applied

        reason = check_plan_applied(load, cfg.c2r_plan)
        if reason:
            raise MoEExtConfigError(f"--moe-c2r-plan {reason}")
    _check_routing_marker(cfg, load, finetune=bool(getattr(a, "finetune", False)))


def _check_output(path: Any, *, flag: str, kind: str) -> None:
    """`path` can be written as a `kind` ("file" or "folder"): not the other kind, and below a
    folder this process may write into (the nearest existing one; the rest is created)."""
    if not path:
        return
    if kind == "file" and os.path.isdir(path):
        raise MoEExtConfigError(f"{flag} {path} is a folder; give a file path (the run log is one file).")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise MoEExtConfigError(f"{flag} {path} is an existing file; give a folder path.")
    target = os.path.abspath(path if kind == "folder" else os.path.dirname(os.path.abspath(path)))
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise MoEExtConfigError(f"{flag} {path} lies below {existing}, which is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MoEExtConfigError(f"{flag} {path}: {existing} is not writable; choose a writable location.")


def _check_routing_marker(cfg: MoEExtConfig, load: str, *, finetune: bool) -> None:
    """The checkpoint's routing policy and state against this run's (files/routing_marker.py)."""
    from megatron_moe_ext.files.routing_marker import (
        policy_change_note,
        read_routing_marker,
        routing_mismatch,
    )

    marker = read_routing_marker(load)
    needs = cfg.policy_state()
    # what the checkpoint's tensors hold decides whether Megatron's loader finds the state
    held = _checkpoint_policy_state(load) if needs else []
    if held is None:  # not a format we can read: trust the marker, if any
        held = marker["policy_state"] if marker else list(needs)
    reason = routing_mismatch(load, marker, held, policy=cfg.router_policy, needs=needs,
                              finetune=finetune)
    if reason:
        raise MoEExtConfigError(reason)
    note = policy_change_note(load, marker, cfg.router_policy)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(f"megatron-moe-ext: note: {note}", file=sys.stderr, flush=True)


def _checkpoint_policy_state(load: str):
    """Policy state names whose tensors the latest torch_dist checkpoint in `load` holds, or None
    if that cannot be read (another format, a damaged folder)."""
    from megatron_moe_ext.files.routing_marker import STATE_KEYS

    try:
        it = open(os.path.join(load, "latest_checkpointed_iteration.txt")).read().strip()
        name = "release" if it == "release" else f"iter_{int(it):07d}"
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(os.path.join(load, name)).read_metadata().state_dict_metadata.keys()
    except Exception:  # noqa: BLE001  (any unreadable checkpoint: the check is skipped, Megatron decides)
        return None
    return [state for state, fragment in STATE_KEYS.items() if any(fragment in k for k in keys)]


def _check_c2r(cfg: MoEExtConfig, topology, topk: int) -> None:
    from megatron_moe_ext.routing.policies.c2r import resolve_top_t

    if cfg.c2r_plan:
        from megatron_moe_ext.files.plan import PlanError, load_plan

        try:
            plan = load_plan(cfg.c2r_plan, num_experts=topology.num_experts, ep_size=topology.ep_size,
                             topk=topk)
        except PlanError as e:
            raise MoEExtConfigError(f"--moe-c2r-plan {e}") from None
        if cfg.c2r_top_t is not None and cfg.c2r_top_t != plan.top_t:
            raise MoEExtConfigError(f"--moe-c2r-top-t {cfg.c2r_top_t} differs from the plan's "
                                    f"top_t {plan.top_t} ({cfg.c2r_plan}); drop the flag.")
        return
    try:
        T = resolve_top_t(cfg.c2r_top_t, topology, topk)
    except ValueError as e:
        raise MoEExtConfigError(str(e)) from None
    per_rank = topology.experts_per_rank
    if cfg.c2r_warmup_steps and T > per_rank - 1:
        raise MoEExtConfigError(
            f"--moe-c2r-warmup-steps derives partners among co-resident experts, at most "
            f"{per_rank - 1} here; lower --moe-c2r-top-t to {per_rank - 1} or less.")


def fused_router_problem(cfg: MoEExtConfig, a: Any) -> Optional[str]:
    """The sentence refusing --moe-router-kernel fused for settings its kernel never covers."""
    score = getattr(a, "moe_router_score_function", "softmax") or "softmax"
    lb = getattr(a, "moe_router_load_balancing_type", "aux_loss")
    lb = set(lb if isinstance(lb, (list, tuple)) else [lb])
    fix = "; drop --moe-router-kernel fused or"
    if score != "softmax":
        return f"--moe-router-kernel fused computes softmax scores{fix} use --moe-router-score-function softmax."
    if getattr(a, "moe_router_enable_expert_bias", False):
        return f"--moe-router-kernel fused ranks no expert bias{fix} drop --moe-router-enable-expert-bias."
    if lb - {"aux_loss", "none"}:
        return (f"--moe-router-kernel fused computes the switch aux loss only{fix} use "
                f"--moe-router-load-balancing-type aux_loss or none (not {', '.join(sorted(lb - {'aux_loss', 'none'}))}).")
    if cfg.router_policy == "locmoe-plus" or cfg.locmoe_layout_ep:
        what = "--moe-router-policy locmoe-plus" if cfg.router_policy == "locmoe-plus" else "--moe-locmoe-layout-ep"
        return f"--moe-router-kernel fused does not cover {what} (its choice is not a top-k){fix} drop {what}."
    return None


def _check_locmoe(cfg: MoEExtConfig, a: Any, num_experts: int, ep: int, rpn: int) -> None:
    if cfg.router_policy == "locmoe-plus" and getattr(a, "moe_expert_capacity_factor", None) is None:
        raise MoEExtConfigError(
            "--moe-router-policy locmoe-plus gives tokens fewer than k experts, which Megatron's "
            "dispatchers handle only on the capacity path; set --moe-expert-capacity-factor "
            "(for example 1.0).")
    if cfg.locmoe_capacity == "bound" and getattr(a, "moe_expert_capacity_factor", None) is None:
        raise MoEExtConfigError(
            "--moe-locmoe-capacity bound drops tokens through Megatron's capacity path, which "
            "needs --moe-expert-capacity-factor (the upper clamp, for example 1.25).")
    layout = cfg.locmoe_layout_ep
    if layout is not None:
        mbs = getattr(a, "micro_batch_size", None)
        if ep != 1:   # --moe-ranks-per-node would then count two kinds of rank
            raise MoEExtConfigError(
                f"--moe-locmoe-layout-ep emulates EP {layout} on a one-EP-rank run; set "
                f"--expert-model-parallel-size 1 (it is {ep}) or drop --moe-locmoe-layout-ep.")
        if num_experts % layout:
            raise MoEExtConfigError(
                f"--moe-locmoe-layout-ep {layout} must divide --num-experts {num_experts}.")
        if mbs is not None and mbs % layout:
            raise MoEExtConfigError(
                f"--moe-locmoe-layout-ep {layout} splits each micro-batch's samples over {layout} "
                f"source ranks; set --micro-batch-size to a multiple of {layout} (it is {mbs}).")
        if layout % rpn and rpn % layout:
            raise MoEExtConfigError(
                f"--moe-ranks-per-node {rpn} counts EP {layout}'s ranks under --moe-locmoe-layout-ep "
                "and must divide it (or be a multiple of it).")
    tp_cp = (getattr(a, "tensor_model_parallel_size", 1) or 1) * (getattr(a, "context_parallel_size", 1) or 1)
    if cfg.locmoe_mu > 0 and tp_cp > 1 and rpn % tp_cp:
        raise MoEExtConfigError(
            f"--moe-router-policy {cfg.router_policy} pools its locality statistics over the "
            f"{tp_cp} tensor/context-parallel ranks of a micro-batch, which must share a node, but "
            f"--moe-ranks-per-node {rpn} is not a multiple of --tensor-model-parallel-size x "
            f"--context-parallel-size {tp_cp}.")
    hidden = getattr(a, "hidden_size", None)
    if hidden is not None and hidden % num_experts:
        raise MoEExtConfigError(
            f"--moe-router-policy locmoe starts its gate from GrAP, which needs --hidden-size "
            f"{hidden} divisible by --num-experts {num_experts}.")
    # EP ranks are expert-TP-strided GPUs (routing/topology.EPTopology.from_gpus)
    etp = getattr(a, "expert_tensor_parallel_size", None) or 1
    if rpn >= (layout or ep * etp) and cfg.locmoe_mu > 0:
        warnings.warn("--moe-router-policy locmoe: all EP ranks share one node (--moe-ranks-per-node), "
                      "so every expert is local and the locality loss is constant.")
