"""Routed-expert backends for `--moe-expert-backend torch`: torch grouped GEMM, BF16 or FP8."""

from __future__ import annotations

from typing import Optional


def torch_experts(num_local_experts: int, config, submodules=None, pg_collection=None,
                  name: Optional[str] = None):
    """Megatron experts builder: FP8 GEMMs when the model runs FP8 (`--fp8-format`), else BF16."""
    from megatron_moe_ext.experts.fp8_grouped_mlp import TorchFP8GroupedMLP
    from megatron_moe_ext.experts.grouped_mlp import TorchGroupedMLP

    cls = TorchFP8GroupedMLP if config.fp8 else TorchGroupedMLP
    return cls(num_local_experts, config, submodules, pg_collection=pg_collection, name=name)


def expert_backend_problem(backend: str, settings) -> Optional[str]:
    """The sentence refusing a Megatron setting `--moe-expert-backend backend` cannot run with,
    or None (`settings`: Megatron's args)."""
    get = lambda name, default=None: getattr(settings, name, default)  # noqa: E731
    flag = f"--moe-expert-backend {backend}"
    if backend == "te":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            return (f"{flag} needs Transformer Engine, which is not installed; install it or use "
                    "--moe-expert-backend torch.")
        if not get("moe_grouped_gemm") or get("transformer_impl") != "transformer_engine":
            return (f"{flag} is Megatron's TEGroupedMLP; add --moe-grouped-gemm and "
                    "--transformer-impl transformer_engine.")
    if backend == "sequential" and get("moe_grouped_gemm"):
        return f"{flag} is Megatron's SequentialMLP; drop --moe-grouped-gemm."
    if backend == "torch":
        if get("add_bias_linear", False):
            return f"{flag} has no expert biases; add --disable-bias-linear."
        etp = get("expert_tensor_parallel_size")
        if etp not in (None, 1):
            return (f"{flag} keeps whole experts on each rank and does not shard fc1/fc2 over "
                    f"--expert-tensor-parallel-size {etp} ranks; set --expert-tensor-parallel-size 1 "
                    "(Megatron defaults it to --tensor-model-parallel-size), which keeps attention TP, "
                    "or use --moe-expert-backend sequential.")
        if get("use_te_activation_func"):
            return (f"{flag} applies Megatron's --activation-func itself, while --use-te-activation-func "
                    "asks for Transformer Engine's activation modules; drop --use-te-activation-func or "
                    "use --moe-expert-backend te.")
        if get("delay_wgrad_compute"):
            return (f"{flag} computes its weight gradients inside its backward, while "
                    "--delay-wgrad-compute defers Transformer Engine's; drop --delay-wgrad-compute or "
                    "use --moe-expert-backend te.")
    return None
