"""Training-time `moe_ext/*` metrics and routing traces, from forward hooks on Megatron's routers.

Every TopKRouter (subclasses included) gets a forward hook that adds `metrics.dispatch_counts` of
its routing map to a per-layer sum on the device: no host sync in the step. `report()` reduces the
sums of all layers over all ranks in one all-reduce (every rank must call it, as the run hooks do
from `training_log`), logs them to Megatron's TensorBoard/W&B writers under `moe_ext/...` and
returns them. Routing traces store the router logits of armed iterations (`--save-routing-trace`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_moe_ext.config import MoEExtConfig
from megatron_moe_ext.files.plan import save_profile
from megatron_moe_ext.files.trace import save_trace, trace_path
from megatron_moe_ext.mcore.router import STAT_FIELDS, PolicyRouter
from megatron_moe_ext.routing.collaboration import (
    coactivation_counts,
    specialization_metrics,
)
from megatron_moe_ext.routing.topology import EPTopology
from megatron_moe_ext.routing.volume import (
    NUM_FIELDS,
    dispatch_counts,
    volume_from_counts,
)

_SCALARS = ("rows_per_token", "remote_rows_per_token", "inter_node_rows_per_token",
            "distinct_ranks_per_token", "bytes_per_token", "inter_node_bytes_per_token", "load_cv")


class MoEMetricsRecorder:
    """Accumulates dispatch/load counts of every router in `model` (a list of model chunks)."""

    def __init__(self, model: List[torch.nn.Module], *, dedup: bool, gpus_per_node: int,
                 bytes_per_element: int = 2, trace_dir: Optional[str] = None,
                 trace_max_tokens: int = 4096, profile_collaboration: bool = False,
                 policy_statistics: bool = False) -> None:
        """`policy_statistics`: the run's routers keep policy statistics (LocMoE's). Every rank
        must agree on it (it is a run-wide flag): `report` reduces them collectively, also on
        pipeline stages without MoE layers."""
        self.routers = [m for chunk in model for m in chunk.modules() if isinstance(m, TopKRouter)]
        self.policy_statistics = policy_statistics
        self.dedup = dedup
        self.bytes_per_element = bytes_per_element
        self.trace_dir = trace_dir
        self.trace_max_tokens = trace_max_tokens
        self._trace_armed = False
        self._trace: Dict[int, torch.Tensor] = {}
        # From the model's config, not a router: a pipeline stage may hold no MoE layer and must
        # still join the collective reduces with tensors of the same shape.
        from megatron.core.utils import get_attr_wrapped_model

        cfg = get_attr_wrapped_model(model[0], "config")
        self.num_experts = cfg.num_moe_experts
        self.topk = cfg.moe_router_topk
        self.hidden_size = cfg.hidden_size
        # One row per layer number, so that pipeline stages holding different layers can reduce
        # one tensor of the same shape.
        self.num_layers = cfg.num_layers + (getattr(cfg, "mtp_num_layers", None) or 0)
        # The model's own process groups (not parallel_state's globals): EP ranks are
        # expert-tensor-parallel-strided GPUs, so a node holds gpus_per_node / ETP of them.
        pg = get_attr_wrapped_model(model[0], "pg_collection")
        self.ep_size, self.ep_rank = get_pg_size(pg.ep), get_pg_rank(pg.ep)
        self.topology = EPTopology.from_gpus(self.num_experts, self.ep_size, gpus_per_node,
                                             get_pg_size(pg.expt_tp))
        # Under sequence parallelism each TP rank routes its own shard of the sequence, so the
        # sum over all ranks counts every token once. Without it (TP > 1 evaluation; Megatron
        # refuses to train MoE so) the TP ranks route the same tokens: only TP rank 0 counts.
        self.counts_tokens = (get_pg_size(pg.tp) == 1 or bool(cfg.sequence_parallel)
                              or get_pg_rank(pg.tp) == 0)
        self.ep_ranks_per_node = self.topology.ranks_per_node
        device = next(model[0].parameters()).device
        self._sums = torch.zeros(self.num_layers + 1, NUM_FIELDS + self.num_experts,
                                 dtype=torch.float64, device=device)
        # Co-activation counts per layer (train and eval batches alike), for C2R profiles.
        self._coact = (torch.zeros(self.num_layers + 1, self.num_experts, self.num_experts,
                                   dtype=torch.float64, device=device)
                       if profile_collaboration else None)
        self._coact_tokens = 0
        for router in self.routers:
            router.register_forward_hook(self._hook)

    @classmethod
    def from_config(cls, model, ext_cfg: MoEExtConfig) -> "MoEMetricsRecorder":
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return cls(model, dedup=ext_cfg.dedup_dispatch,
                   gpus_per_node=ext_cfg.resolved_ranks_per_node(world),
                   bytes_per_element=ext_cfg.ext_metrics_bytes_per_element,
                   trace_dir=ext_cfg.save_routing_trace,
                   trace_max_tokens=ext_cfg.routing_trace_max_tokens,
                   profile_collaboration=bool(ext_cfg.profile_collaboration),
                   policy_statistics=ext_cfg.router_policy != "topk")

    def _hook(self, router: TopKRouter, inputs, output) -> None:
        _, routing_map = output
        layer = router.layer_number or 0
        if not self.counts_tokens:
            return  # another TP rank counts (and traces) these replicated tokens
        if self._coact is not None:
            with torch.no_grad():
                self._coact[layer] += coactivation_counts(routing_map)
        if not (router.training and torch.is_grad_enabled()):
            return  # evaluation batches are not training traffic
        with torch.no_grad():
            self._sums[layer] += dispatch_counts(
                routing_map, ep_size=self.ep_size, ep_ranks_per_node=self.ep_ranks_per_node,
                src_ep_rank=self.ep_rank)
            if self._trace_armed:
                hidden = inputs[0].reshape(-1, inputs[0].shape[-1])[: self.trace_max_tokens]
                self._trace[layer] = {
                    "logits": router.gating(hidden).float().cpu(),
                    # how training ranked them, so offline selection ranks the same scores
                    "score_function": router.score_function,
                    "pre_softmax": bool(router.config.moe_router_pre_softmax),
                    "expert_bias": None if router.expert_bias is None else router.expert_bias.float().cpu(),
                    # cosine affinities (LocMoE+) = logits / (|x| |w_e|)
                    "hidden_norm": hidden.float().norm(dim=-1).cpu(),
                    "gate_norm": router.weight.float().norm(dim=-1).detach().cpu(),
                }
                sources = getattr(router, "token_sources", lambda _x: None)(inputs[0])
                if sources is not None:   # an emulated layout: the source ranks its router used
                    self._trace[layer].update(layout_ep=int(router.layout_ep),
                                              layout_src=sources[: self.trace_max_tokens].cpu())

    def arm_trace(self) -> None:
        """Record router logits during the next training iteration."""
        self._trace_armed = self.trace_dir is not None

    def save_armed_trace(self, iteration: int) -> Optional[str]:
        """Write the logits recorded since `arm_trace()` and disarm; returns the file written."""
        if not self._trace_armed:
            return None
        self._trace_armed = False
        layers, self._trace = self._trace, {}
        if not layers:
            return None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = save_trace(trace_path(self.trace_dir, iteration, rank), layers,
                          iteration=iteration, num_experts=self.num_experts, topk=self.topk,
                          ep_size=self.ep_size, ep_rank=self.ep_rank,
                          ep_ranks_per_node=self.topology.ranks_per_node)
        return str(path)

    def write_profile(self, directory: str) -> Optional[str]:
        """Sum co-activation over all ranks and write the profile (rank 0). Collective."""
        if self._coact is None:
            return None
        coact = self._coact.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(coact)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
        layers = {i: coact[i].cpu() for i in range(coact.shape[0]) if coact[i].sum() > 0}
        if not layers:
            return None
        # every token adds topk to the diagonal's sum
        tokens = int(next(iter(layers.values())).diagonal().sum().item()) // max(1, self.topk)
        metrics = {i: specialization_metrics(c) for i, c in layers.items()}
        return str(save_profile(directory, layers, topk=self.topk, tokens=tokens, metrics=metrics))

    def report(self, iteration: int) -> Dict[str, object]:
        """Reduce, log and reset. Collective over the default group: call on every rank.

        Returns `moe_ext/<metric>` over all MoE layers and `moe_ext/layer_<n>/<metric>` per
        layer (scalars), plus `moe_ext/expert_load` lists (per layer) for plots."""
        sums = self._sums.clone()
        self._sums.zero_()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        out: Dict[str, object] = {}
        out.update(self._policy_statistics())  # collective too: before any early return
        layers = [i for i in range(sums.shape[0]) if sums[i, 0] > 0]
        if not layers:
            return out
        kw = dict(dedup=self.dedup, hidden_size=self.hidden_size,
                  bytes_per_element=self.bytes_per_element)
        total = volume_from_counts(sums[layers].sum(0), **kw)
        out.update({f"moe_ext/{k}": getattr(total, k) for k in _SCALARS})
        out["moe_ext/tokens"] = total.tokens / len(layers)
        for i in layers:
            v = volume_from_counts(sums[i], **kw)
            out.update({f"moe_ext/layer_{i}/{k}": getattr(v, k) for k in _SCALARS})
            out[f"moe_ext/layer_{i}/expert_load"] = v.expert_load
        self._write(out, iteration)
        return out

    def _policy_statistics(self) -> Dict[str, float]:
        """Means of the statistics the policy routers keep (`PolicyRouter.take_statistics`):
        locality KL, capacity factor and the clamped share (LocMoE), dropped tokens and capacity
        (LocMoE+). One all-reduce."""
        if not self.policy_statistics:
            return {}
        stats = torch.zeros(len(STAT_FIELDS), dtype=torch.float64)
        for r in self.routers:
            if isinstance(r, PolicyRouter):
                stats += r.take_statistics()
        if torch.distributed.is_initialized():
            stats = stats.to(self._sums.device)
            torch.distributed.all_reduce(stats)
            stats = stats.cpu()
        s = dict(zip(STAT_FIELDS, stats.tolist()))
        out = {}
        if s["locality_kl_count"] > 0:
            out["moe_ext/locality_kl"] = s["locality_kl_sum"] / s["locality_kl_count"]
        if s["capacity_factor_count"] > 0:
            out["moe_ext/capacity_factor"] = s["capacity_factor_sum"] / s["capacity_factor_count"]
            out["moe_ext/capacity_clamped_fraction"] = s["capacity_clamped"] / s["capacity_factor_count"]
        if s["expert_capacity_count"] > 0:
            out["moe_ext/dropped_token_fraction"] = s["dropped_tokens"] / max(1.0, s["routed_tokens"])
            out["moe_ext/expert_capacity"] = s["expert_capacity_sum"] / s["expert_capacity_count"]
        return out

    @staticmethod
    def _write(out: Dict[str, object], iteration: int) -> None:
        from megatron.training.global_vars import (
            get_tensorboard_writer,
            get_wandb_writer,
        )

        scalars = {k: float(v) for k, v in out.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        writer = get_tensorboard_writer()
        if writer is not None:
            for k, v in scalars.items():
                writer.add_scalar(k, v, iteration)
        wandb = get_wandb_writer()
        if wandb is not None:
            wandb.log(scalars, iteration)
