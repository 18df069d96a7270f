"""What the plugin adds to Megatron's training loop without forking it.

* a post-wrap hook on the model config that keeps the built model and attaches the `moe_ext/*`
  metrics recorder to every router of it;
* a wrapper around `megatron.training.training.train_step` that, after each optimizer step and on
  every rank, advances the modules' per-iteration state (mcore/iteration.py: C2R's warm-up
  freeze, LocMoE's bias switch and capacity estimate, LocMoE+'s re-estimate, the FP8 weight
  cache), so nothing of it changes inside a forward;
* a wrapper around `megatron.training.training.training_log` (called on every rank once per
  iteration) that reports those metrics every `--log-interval` iterations and appends the losses to
  the JSON-lines run log (`--moe-ext-run-log`);
* wrappers around `evaluate_and_print_results` and `evaluate` that append validation and test
  losses, with the iteration they belong to, to the run log.

The wrappers call the original function first and change nothing it does or prints. Replacing
Megatron's functions with them goes through the patch registry (scope "training" of
`compat/megatron_0_19.py`), which keeps the originals and can put them back.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Dict, Optional

import torch

from megatron_moe_ext.config import MoEExtConfig

_STATE: Dict[str, Any] = {"recorder": None, "ext_cfg": None, "last_time": None, "eval_ctx": None,
                          "model": None}


def install_run_hooks(model_cfg: Any, ext_cfg: MoEExtConfig) -> None:
    """Register the hooks for one training run (call once, before pretrain())."""
    from megatron_moe_ext.compat.megatron_0_19 import apply_patches

    _STATE["ext_cfg"] = ext_cfg
    model_cfg.post_wrap_hooks.append(_keep_model)
    # Idempotent: a second run in the same process keeps the installed wrappers, which read
    # _STATE, so they serve the new run.
    apply_patches("training", RUN_HOOK_WRAPPERS)


def _keep_model(model):
    ext_cfg = _STATE["ext_cfg"]
    _STATE["model"] = model
    from megatron.core.utils import get_attr_wrapped_model

    # A dense model (no --num-experts) has no routing to record; its losses still go to the run log.
    has_moe = bool(getattr(get_attr_wrapped_model(model[0], "config"), "num_moe_experts", None))
    if has_moe and (ext_cfg.ext_metrics or ext_cfg.save_routing_trace or ext_cfg.profile_collaboration):
        from megatron_moe_ext.mcore.metrics_hook import MoEMetricsRecorder

        _STATE["recorder"] = MoEMetricsRecorder.from_config(model, ext_cfg)
    elif not has_moe:
        _STATE["recorder"] = None
    return model


def _wrap_train_step(original):
    @functools.wraps(original)
    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        from megatron_moe_ext.mcore.iteration import end_iteration

        # Megatron passes the iterations completed before this step; this one is the next
        iteration = kwargs.get("iteration")
        if iteration is None:
            from megatron.training import get_args

            iteration = get_args().curr_iteration
        if _STATE["model"] is not None:
            end_iteration(_STATE["model"], int(iteration) + 1)
        return result

    return train_step


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _append_run_log(record: Dict[str, Any]) -> None:
    path = _STATE["ext_cfg"].run_log if _STATE["ext_cfg"] else None
    if not path or not _is_logging_rank():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _scalar(v: Any) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def _wrap_training_log(original):
    @functools.wraps(original)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        result = original(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        from megatron.training import get_args

        now = time.time()
        record: Dict[str, Any] = {"kind": "train", "iteration": int(iteration)}
        record.update({k: _scalar(v) for k, v in loss_dict.items()})
        if learning_rate is not None:
            record["lr"] = float(learning_rate)
        if _STATE["last_time"] is not None:
            record["seconds"] = now - _STATE["last_time"]
        _STATE["last_time"] = now
        recorder = _STATE["recorder"]
        margs = get_args()
        if recorder is not None:
            _handle_traces(recorder, iteration, margs)
            if iteration % (margs.log_interval or 1) == 0:
                metrics = recorder.report(iteration)  # collective: every rank gets here
                record.update(metrics)
                if metrics and _is_logging_rank():
                    print(" moe_ext | " + " | ".join(
                        f"{k.removeprefix('moe_ext/')}: {v:.4g}" for k, v in metrics.items()
                        if isinstance(v, float) and "/layer_" not in k), flush=True)
        _append_run_log(record)
        return result

    return training_log


def _handle_traces(recorder, iteration: int, margs) -> None:
    """Save the trace recorded during `iteration`, and arm the next one if it is due."""
    saved = recorder.save_armed_trace(iteration)
    if saved and _is_logging_rank():
        print(f" moe_ext | routing trace of iteration {iteration} written beside {saved}", flush=True)
    interval = _STATE["ext_cfg"].routing_trace_interval
    nxt = iteration + 1
    if (nxt % interval == 0) if interval else (nxt == margs.train_iters):
        recorder.arm_trace()


def _wrap_evaluate(original):
    @functools.wraps(original)
    def evaluate(*args, **kwargs):
        total_loss_dict, collected, timelimit = original(*args, **kwargs)
        ctx = _STATE["eval_ctx"]
        if total_loss_dict and ctx is not None:
            prefix, iteration = ctx
            record = {"kind": "test" if "test set" in prefix else "valid",
                      "iteration": int(iteration)}
            record.update({k: _scalar(v) for k, v in total_loss_dict.items()})
            _append_run_log(record)
        return total_loss_dict, collected, timelimit

    return evaluate


def _wrap_evaluate_and_print(original):
    @functools.wraps(original)
    def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration,
                                   *args, **kwargs):
        _STATE["eval_ctx"] = (prefix, iteration)
        try:
            return original(prefix, forward_step_func, data_iterator, model, iteration,
                            *args, **kwargs)
        finally:
            _STATE["eval_ctx"] = None

    return evaluate_and_print_results


# Registry entry name -> wrapper factory (the original function -> its wrapper).
RUN_HOOK_WRAPPERS: Dict[str, Callable[[Callable], Callable]] = {
    "run-hook-train-step": _wrap_train_step,
    "run-hook-training-log": _wrap_training_log,
    "run-hook-evaluate": _wrap_evaluate,
    "run-hook-evaluate-context": _wrap_evaluate_and_print,
}


def finish_run() -> None:
    """After pretrain() returns: write the collaboration profile, if one was asked for."""
    recorder, ext_cfg = _STATE["recorder"], _STATE["ext_cfg"]
    if recorder is not None and ext_cfg is not None and ext_cfg.profile_collaboration:
        path = recorder.write_profile(ext_cfg.profile_collaboration)
        if path:
            print(f" moe_ext | collaboration profile written to {path}", flush=True)


def current_recorder() -> Optional[Any]:
    """The metrics recorder of the running training job, if any (for tests and tools)."""
    return _STATE["recorder"]
