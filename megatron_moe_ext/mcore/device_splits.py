"""The one-rank (EP = 1) dispatch with its split sizes kept on the device: no host wait per layer.

Megatron's alltoall dispatcher copies the tokens-per-expert counts to the host and waits for
them on every forward, even on one EP rank, where nothing is exchanged: SequentialMLP and
TEGroupedMLP split their input on the host. The plugin's torch experts (`--moe-expert-backend
torch`) take the counts on the device (torch._grouped_mm reads offsets from device memory), so
on one rank the dispatcher can skip that copy and wait. Its second permutation (sorting received
chunks by local expert) is the identity on one rank with expert TP 1, and is skipped too. What is
left (the router, the argsort permutation with its static output size tokens x topk, the
grouped GEMMs, the unpermutation) has static shapes and no host read: the MoE layer can then run
ahead of the GPU and be captured in a CUDA graph (issue 16). Without TE's fused permutation the
permutation itself is replaced too, by one whose backward is a gather instead of Megatron's
atomic index_add (kernels/gather_permute.py).

Installed by the plugin's MoE layers (`DeviceSplitsMoELayer`, and `DedupMoELayer` at EP = 1)
where `device_splits_problem` finds nothing against it; elsewhere Megatron's dispatcher stays.
It computes the same function as Megatron's (tests/test_device_splits.py)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.utils import get_pg_size

from megatron_moe_ext.kernels.gather_permute import (
    gather_permute,
    gather_unpermute,
    permutation_maps,
    permute_probs,
)


def device_splits_problem(layer: MoELayer) -> Optional[str]:
    """Why `layer` keeps Megatron's dispatcher (a reason, for logs and tests), or None."""
    cfg = layer.config
    dispatcher = layer.token_dispatcher
    if type(dispatcher) is not MoEAlltoAllTokenDispatcher:
        return f"the dispatcher is {type(dispatcher).__name__}, not Megatron's alltoall dispatcher"
    if dispatcher.ep_size != 1 or dispatcher.tp_size != 1:
        return "more than one expert-parallel or expert-tensor-parallel rank: splits go to the host for the all-to-all"
    if cfg.moe_expert_capacity_factor is not None or cfg.moe_pad_expert_input_to_capacity:
        return "token dropping: the number of rows is data-dependent"
    if cfg.moe_router_padding_for_quantization:
        return "router padding for quantization: the number of rows is data-dependent"
    if not getattr(layer.experts, "counts_on_device", False):
        return f"{type(layer.experts).__name__} reads its tokens-per-expert on the host"
    if getattr(cfg, "transformer_impl", None) == "inference_optimized":
        return "the inference-optimized MoE layer restores its own training dispatcher every forward"
    if _captures_preprocess_alone(cfg):
        # Megatron's per-layer graphs of moe_router + moe_preprocess hand the dispatcher's state to
        # the rest of the layer through its `cudagraph_attrs`; this dispatcher keeps other state
        return "Megatron's moe_preprocess CUDA graph hands over only Megatron's dispatcher state"
    return None


def _captures_preprocess_alone(cfg) -> bool:
    if getattr(cfg, "cuda_graph_impl", "none") not in ("local", "transformer_engine"):
        return False
    modules = getattr(cfg, "cuda_graph_modules", None) or []
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    return any(getattr(m, "name", m) in ("moe_preprocess", "moe_router") for m in modules)


class DeviceSplitsTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's alltoall dispatcher on one EP rank (expert TP 1, dropless), counts on the device.
    dispatch_postprocess returns tokens_per_expert [E] as a device tensor. Without TE's fused
    permutation (--moe-permute-fusion), the permutation is kernels/gather_permute.py's: Megatron's
    row order, both directions gathers (no atomics)."""

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert: Optional[torch.Tensor] = None):
        return tokens_per_expert  # nothing needs the host: no copy, no wait

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """[S, B, H] tokens, [T, E] map and probs -> rows [T x k, H] grouped by expert, probs [T x k]."""
        if self.config.moe_permute_fusion:
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        hidden = hidden_states.view(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden.shape
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden.view(self.hidden_shape))
        self.maps = permutation_maps(routing_map, self.config.moe_router_topk)
        # what Megatron's preprocess gives on one rank, dropless: the counts and N = T x k rows
        self.tokens_per_expert = self.maps.tokens_per_expert
        self.num_out_tokens = self.maps.token_of_row.shape[0]
        return gather_permute(hidden, self.maps), permute_probs(probs, self.maps)

    def combine_postprocess(self, permuted_tokens: torch.Tensor) -> torch.Tensor:
        """Rows [T x k, H] -> [S, B, H], each token the sum of its rows, plus the shared experts."""
        if self.config.moe_permute_fusion:
            return super().combine_postprocess(permuted_tokens)
        output = gather_unpermute(permuted_tokens, self.maps).view(self.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output

    def dispatch_postprocess(self, global_input_tokens: torch.Tensor, global_probs: torch.Tensor):
        """One source rank: rows are already grouped by local expert."""
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def install_device_splits(layer: MoELayer, pg_collection) -> bool:
    """Swap `layer`'s dispatcher for DeviceSplitsTokenDispatcher (on the layer's process groups,
    `pg_collection`) where it applies; True if swapped."""
    if device_splits_problem(layer) is not None:
        return False
    old = layer.token_dispatcher
    new = DeviceSplitsTokenDispatcher(old.num_local_experts, old.local_expert_indices,
                                      config=layer.config, pg_collection=pg_collection)
    if old.shared_experts is not None:
        new.set_shared_experts(old.shared_experts)
    layer.token_dispatcher = new
    return True


class DeviceSplitsMoELayer(MoELayer):
    """MoELayer that installs DeviceSplitsTokenDispatcher where it applies (see the module doc).

    Megatron chooses dispatchers with a fixed if/elif on `moe_token_dispatcher_type`, so the base
    constructor builds its own and this swaps it afterwards."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None,
                 pg_collection=None, is_mtp_layer: bool = False, name: Optional[str] = None,
                 device_splits: bool = True):
        # resolved once, as MoELayer would, so that both dispatchers share the layer's groups
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        if device_splits and get_pg_size(pg_collection.ep) == 1:  # False: --moe-ep1-host-splits
            install_device_splits(self, pg_collection)
