"""Routed experts on torch's grouped GEMM (`--moe-expert-backend torch`): no Transformer Engine.

All local experts' weights live in two stacked parameters, so each projection of all experts is
one `torch._grouped_mm` over the permuted tokens (offsets = cumulative tokens per expert, kept on
the device: no host sync, unlike SequentialMLP's `.tolist()`). The matmul sits behind one method,
`grouped_mm`, which the FP8 subclass replaces.

Checkpoints: the distributed-checkpoint keys, shapes and offsets are SequentialMLP's and
TEGroupedMLP's (`<prefix>experts.linear_fc1.weight`, one expert axis of size num_experts), so a
torch_dist checkpoint moves between the three backends.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_moe_ext.experts.weighted_activation import weighted_gelu, weighted_swiglu
from megatron_moe_ext.kernels.triton_support import use_triton


class _Stacked(torch.nn.Module):
    """Holds `weight` [E_local, out, in], named like the linear it replaces. Its (empty) extra
    state stands for the per-expert `_extra_state` entries Megatron's linears checkpoint."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype, device) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, out_features, in_features,
                                                     dtype=dtype, device=device))

    def get_extra_state(self):
        return None

    def set_extra_state(self, state) -> None:
        pass  # nothing to restore: no FP8 metadata is kept between steps


class TorchGroupedMLP(MegatronModule):
    """Megatron experts module: (tokens [T, h] permuted by expert, tokens_per_expert [E_local],
    probs [T]) -> (out [T, h], None). fc1: [E_local, F or 2F (GLU: gate then up), h];
    fc2: [E_local, h, F]. tokens_per_expert may live on the host or the device."""

    # mcore/device_splits.py: the dispatcher may skip its host copy. (The fallback for float64 and
    # odd widths, _looped_mm, and the FP8 wgrad's, split on the host: correct, not capturable.)
    counts_on_device = True

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 name: Optional[str] = None) -> None:
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("--moe-expert-backend torch has no expert biases; add --disable-bias-linear.")
        etp = getattr(pg_collection, "expt_tp", None)
        if etp is not None and etp.size() > 1:
            raise ValueError("--moe-expert-backend torch does not shard experts over tensor parallel "
                             "ranks; set --expert-tensor-parallel-size 1.")
        self.num_local_experts = num_local_experts
        self.pg_collection = pg_collection
        h = config.hidden_size
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.linear_fc1 = _Stacked(num_local_experts, fc1_out, h, config.params_dtype, device)
        self.linear_fc2 = _Stacked(num_local_experts, h, ffn, config.params_dtype, device)
        for p in self.parameters():
            p.allowed_in_cuda_graph = False
            setattr(p, "allreduce", False)  # expert parameters: reduced over expert-DP, as Megatron's
        self._init_weights()

    def _init_weights(self) -> None:
        """Each expert slice with Megatron's init methods under the expert-parallel RNG, as
        SequentialMLP's linears do."""
        from megatron.core.tensor_parallel.random import (
            get_cuda_rng_tracker,
            get_expert_parallel_rng_tracker_name,
        )

        if not self.config.perform_initialization:
            return
        with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()), torch.no_grad():
            for i in range(self.num_local_experts):
                self.config.init_method(self.linear_fc1.weight[i])
                self.config.output_layer_init_method(self.linear_fc2.weight[i])

    # -- the one overridable matmul ----------------------------------------------------------
    def grouped_mm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x [T, in] (rows grouped by expert), weight [G, out, in], offs [G] int32 end offsets ->
        [T, out], row block g multiplied by weight[g]^T."""
        if _grouped_mm_supported(x, weight):
            return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
        return _looped_mm(x, weight, offs)

    def activation(self, fc1_out: torch.Tensor) -> torch.Tensor:
        """Megatron's MLP activation (GLU: act(gate) * up, with its clamp and offset)."""
        cfg = self.config
        if not cfg.gated_linear_unit:
            return cfg.activation_func(fc1_out)
        gate, up = torch.chunk(fc1_out, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            gate, up = gate.clamp(max=val), up.clamp(min=-val, max=val)
        return cfg.activation_func(gate) * (up + cfg.glu_linear_offset)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        if self.config.moe_apply_probs_on_input:
            tokens = (probs.unsqueeze(-1) * tokens).to(tokens.dtype)
            probs = torch.ones_like(probs)
        offs = torch.cumsum(tokens_per_expert.to(device=tokens.device), 0).to(torch.int32)
        fc1_out = self.grouped_mm(tokens, self.linear_fc1.weight, offs)
        if self._plain_swiglu() and use_triton(fc1_out):
            hidden = weighted_swiglu(fc1_out, probs)  # one fused pass each way (weighted_activation.py)
        elif self._plain_gelu() and use_triton(fc1_out):
            hidden = weighted_gelu(fc1_out, probs)    # the same for GELU
        elif self._plain_swiglu() and self.config.bias_activation_fusion:
            from megatron.core.fusions.fused_bias_swiglu import (
                weighted_bias_swiglu_impl,
            )

            # Megatron's fused SwiGLU x probs (--bias-swiglu-fusion), as its MLP and TEGroupedMLP use
            hidden = weighted_bias_swiglu_impl(fc1_out, None, probs.unsqueeze(-1))
        else:
            hidden = self.activation(fc1_out)
            # Megatron scales after the activation, in the activation's dtype (mlp.py per_token_scale).
            hidden = (hidden * probs.unsqueeze(-1)).to(hidden.dtype)
        return self.grouped_mm(hidden, self.linear_fc2.weight, offs), None

    def backward_dw(self) -> None:
        """Megatron's EP all-to-all overlap schedule calls this for delayed weight gradients; this
        module computes them in its backward (--delay-wgrad-compute is refused at parse time)."""

    def _plain_swiglu(self) -> bool:
        """SwiGLU without Megatron's clamp or linear offset: what the fused paths compute."""
        cfg = self.config
        return bool(cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
                    and cfg.activation_func_clamp_value is None and not cfg.glu_linear_offset)

    def _plain_gelu(self) -> bool:
        """Torch's erf GELU without a GLU: what the fused GELU kernel computes."""
        return not self.config.gated_linear_unit and self.config.activation_func is torch.nn.functional.gelu

    # -- distributed checkpoints: SequentialMLP's keys ----------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.dist_checkpointing.mapping import (
            ShardedTensor,
            ShardedTensorFactory,
        )
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        num_global = self.config.num_moe_experts
        first = self.pg_collection.ep.rank() * self.num_local_experts if self.pg_collection else 0
        dp_rank = self.pg_collection.expt_dp.rank() if self.pg_collection is not None and \
            getattr(self.pg_collection, "expt_dp", None) is not None else 0
        axis = len(sharded_offsets)
        state = {}
        for name in ("linear_fc1", "linear_fc2"):
            key = f"{prefix}experts.{name}.weight"

            def build(key, data, replica_id, flattened_range, _axis=axis):
                return {str(i): ShardedTensor.from_rank_offsets(
                    key, data[i], *sharded_offsets, (_axis, first + i, num_global),
                    replica_id=(0, 0, dp_rank), prepend_axis_num=_axis + 1)
                    for i in range(data.shape[0])}

            def merge(sub):
                return torch.stack([sub[str(i)] for i in range(len(sub))])

            state[f"{prefix}{name}.weight"] = ShardedTensorFactory(
                key, getattr(self, name).weight, build, merge, (0, 0, dp_rank))

            # SequentialMLP's linears save one `_extra_state` object per expert; save the same
            # (empty) objects so that a checkpoint of this module loads there too.
            def build_extra(key, data, replica_id, flattened_range, _axis=axis):
                return {str(i): make_sharded_object_for_checkpoint(
                    None, key, (*sharded_offsets, (_axis, first + i, num_global)), (0, 0, dp_rank))
                    for i in range(data.shape[0])}

            # (its data is a placeholder, not the weight: Megatron's optimizer finds each
            # parameter's sharding by the tensor a factory holds)
            state[f"{prefix}{name}._extra_state"] = ShardedTensorFactory(
                f"{prefix}experts.{name}._extra_state", torch.empty(self.num_local_experts, 0),
                build_extra, lambda sub: None, (0, 0, dp_rank))
        return state


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm takes bf16/fp16/fp32 and rows whose byte stride is a multiple of 16."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or weight.dtype != x.dtype:
        return False
    return (x.shape[-1] * x.element_size()) % 16 == 0 and (weight.shape[-2] * x.element_size()) % 16 == 0


def _looped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """One matmul per expert: the fallback for float64 and odd widths (host sync for the splits)."""
    sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
    parts = [chunk @ weight[g].t() for g, chunk in enumerate(torch.split(x, sizes))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[-2])
