"""A token dispatcher that sends each token once per destination EP rank, and the MoELayer that
installs it (`--moe-dedup-dispatch`).

Megatron's alltoall dispatcher permutes one row per (token, expert) before its all-to-all, so a
token routed to k experts of one rank crosses the network k times. Here a token crosses once per
rank, with its local probabilities and routing-map slice; the receiver expands it per local
expert (the experts apply the probabilities, as in the stock path), sums each token's local
expert outputs before the combine all-to-all, and the sender sums over ranks. Forward and
gradients equal the stock dispatcher's up to float rounding (tests/test_dedup_dispatch.py).

Supported: any router (it reads only probs and routing_map), token dropping with a capacity
factor. Not supported (`dedup_problem`, checked at argument parsing and again at construction):
another dispatcher type, expert tensor parallelism > 1 (attention TP > 1 with expert TP 1 is
supported: each TP rank routes its own sequence-parallel shard), padding to capacity, router
padding for quantization, shared-expert overlap, the inference-optimized transformer implementation (its MoE
layer is not a MoELayer the spec can swap).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.tensor_parallel.mappings import all_to_all
from megatron.core.transformer.moe.moe_utils import (
    get_default_pg_collection,
    permute,
    unpermute,
)
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.utils import get_pg_size

from megatron_moe_ext.mcore.device_splits import DeviceSplitsMoELayer
from megatron_moe_ext.routing.dedup import local_slices, rank_rows


def dedup_problem(settings) -> Optional[str]:
    """The sentence refusing a setting DedupAlltoAllTokenDispatcher does not support, or None.
    `settings`: Megatron's args or TransformerConfig (the same attribute names)."""
    get = lambda name, default=None: getattr(settings, name, default)  # noqa: E731
    if get("moe_token_dispatcher_type", "alltoall") != "alltoall":
        return ("--moe-dedup-dispatch replaces the alltoall dispatcher; set "
                "--moe-token-dispatcher-type alltoall.")
    if get("transformer_impl") == "inference_optimized":
        return ("--moe-dedup-dispatch does not apply to --transformer-impl inference_optimized, whose "
                "MoE layer keeps its own dispatcher; use transformer_engine or local.")
    etp = get("expert_tensor_parallel_size")
    if etp not in (None, 1):
        return (f"--moe-dedup-dispatch sends a token once per EP rank, but --expert-tensor-parallel-size "
                f"{etp} shards each expert over {etp} ranks that all need the row, which this "
                "dispatcher does not do; set --expert-tensor-parallel-size 1 (Megatron defaults it to "
                "--tensor-model-parallel-size), which keeps attention TP.")
    for bad, flag in ((get("moe_pad_expert_input_to_capacity"), "--moe-pad-expert-input-to-capacity"),
                      (get("moe_router_padding_for_quantization"), "--moe-router-padding-for-quantization"),
                      (get("moe_shared_expert_overlap"), "--moe-shared-expert-overlap")):
        if bad:
            return f"--moe-dedup-dispatch does not support {flag} yet; drop one of them."
    return None


class DedupAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """MoEAlltoAllTokenDispatcher with one row per (token, destination rank) each way."""

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config,
                 pg_collection=None) -> None:
        problem = dedup_problem(config)
        if problem:
            raise ValueError(problem)
        super().__init__(num_local_experts, local_expert_indices, config=config,
                         pg_collection=pg_collection)

    def set_shared_experts(self, shared_experts):
        raise ValueError("--moe-dedup-dispatch does not support --moe-shared-expert-overlap yet; "
                         "drop one of them.")

    # --- dispatch ------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """[S, B, H] tokens -> rows [n, H] and their local probs [n, L], grouped by rank."""
        self.hidden_shape = hidden_states.shape
        self.routing_map, self.probs = routing_map, probs
        hidden = hidden_states.reshape(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden.shape
        self.rows = rank_rows(routing_map, self.ep_size)
        self.send_map = local_slices(routing_map, self.rows, self.ep_size)
        counts = self.rows.rows_per_rank
        # the all-to-all needs its split sizes on the host: one copy of both directions per layer
        self.input_splits, self.output_splits = torch.stack([counts, self._exchange_counts(counts)]).tolist()
        return hidden.index_select(0, self.rows.token), local_slices(probs, self.rows, self.ep_size)

    def _exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return counts
        recv = torch.empty_like(counts)
        torch.distributed.all_to_all_single(recv, counts.contiguous(), group=self.ep_group)
        return recv

    def token_dispatch(self, rows: torch.Tensor, row_probs: torch.Tensor):
        """All-to-all of the rows, their local probabilities and routing-map slices."""
        recv_rows = all_to_all(self.ep_group, rows, self.output_splits, self.input_splits)
        recv_probs = all_to_all(self.ep_group, row_probs, self.output_splits, self.input_splits)
        # The map travels as the probabilities' dtype; it carries no gradient.
        recv_map = all_to_all(self.ep_group, self.send_map.to(row_probs.dtype).detach(),
                              self.output_splits, self.input_splits)
        self.recv_map = recv_map.bool()
        return recv_rows, recv_probs

    def dispatch_postprocess(self, recv_rows: torch.Tensor, recv_probs: torch.Tensor):
        """Expand received rows per local expert (expert-major, as the experts expect)."""
        tokens_per_expert = self.recv_map.sum(0)
        self.num_recv_rows = recv_rows.shape[0]
        expanded, expanded_probs, self.expand_indices, _, _ = permute(
            recv_rows, self.recv_map, probs=recv_probs,
            num_out_tokens=int(tokens_per_expert.sum()))
        return expanded, tokens_per_expert.cpu(), expanded_probs

    # --- combine -------------------------------------------------------------------------------
    def combine_preprocess(self, expert_output: torch.Tensor) -> torch.Tensor:
        """Sum each received row's weighted local expert outputs: [rows x experts, H] -> [N, H]."""
        return unpermute(expert_output, self.expand_indices,
                         restore_shape=torch.Size((self.num_recv_rows, expert_output.shape[-1])))

    def token_combine(self, hidden_states: torch.Tensor, async_finish: bool = True,
                      allocate_on_comm_stream: bool = True) -> torch.Tensor:
        return all_to_all(self.ep_group, hidden_states, self.input_splits, self.output_splits)

    def combine_postprocess(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum each token's rows from all ranks and restore [S, B, H]."""
        out = unpermute(rows, self.rows.token, restore_shape=self.hidden_shape_before_permute)
        return out.view(self.hidden_shape)


class DedupMoELayer(DeviceSplitsMoELayer):
    """MoELayer whose token dispatcher is DedupAlltoAllTokenDispatcher on more than one EP rank.

    On one EP rank a token's rows never leave it, so there is nothing to deduplicate: the layer
    keeps DeviceSplitsMoELayer's choice (its sync-free dispatcher where it applies, else
    Megatron's), which computes the same function (the results study's top-k and top-k + dedup
    rows agree to the last digit)."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None,
                 pg_collection=None, is_mtp_layer: bool = False, name: Optional[str] = None,
                 device_splits: bool = True):
        problem = dedup_problem(config)
        if problem:
            raise ValueError(problem)
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name, device_splits=device_splits)
        if get_pg_size(pg_collection.ep) == 1:
            return
        self.token_dispatcher = DedupAlltoAllTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config=config,
            pg_collection=pg_collection)
        if getattr(self, "shared_expert_overlap", False):
            self.token_dispatcher.set_shared_experts(self.shared_experts)
