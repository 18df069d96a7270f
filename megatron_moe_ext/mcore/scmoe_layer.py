"""ScMoE and DGMoE decoder layers (Cai et al., ICML 2025; the methods doc section 3).

A shortcut-connected MoE block l+1 gives its routed experts an earlier representation than its
own post-attention stream, so their all-to-all can run while the current block computes:

  pos2   H_{l+1} = H^MH_{l+1} + SE(H^MH_{l+1}) * sigmoid(w_cg . H^MH_{l+1}) + sum_i G_i E_i(H^MH_l)
         (H^MH_l: the dense block l's post-attention stream, handed over by a `ShortcutLink`)
  pos1   the same, with the routed experts on block l+1's input (= block l's output)
  dgmoe  H_{l+1} = H^MH_{l+1} + sum_i G_i(prev) E_i(prev) + sum_i G_i(cur) E_i(cur), one expert
         set and one gate; a token's current pass may not pick an expert its previous pass picked
         (the paper's collision rule: the current top-1 moves to its second choice)

Every representation goes through a norm first: the routed input through the layer's own
`shortcut_layernorm` (the third-party torchtitan code's choice; the paper omits pre-LN), the
current stream through `pre_mlp_layernorm`. The shared expert and its CG-1 sigmoid gate are
Megatron's `SharedExpertMLP` with `--moe-shared-expert-gate`, which computes exactly
SE(x) * sigmoid(x w_cg^T) on the current stream.

Schedule (`RoutedPass`): the router, permutation and dispatch all-to-all run on a side CUDA
stream from the moment the routed input exists; the expert GEMMs run on the main stream at one
of four points ("slots"); the combine all-to-all goes back to the side stream; the unpermute and
the final add wait for it at the end of block l+1. Slots, in main-stream order after the start:
  1  before block l's MLP (pos2/dgmoe only: the start happens inside block l)
  2  before block l+1's attention
  3  after block l+1's attention
  4  after block l+1's shared expert (or DGMoE's current pass)
On CPU the streams are Megatron's no-op stand-ins and the same code runs in the same order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_moe_ext.mcore.scmoe_slots import SlotChooser

SCMOE_MODES = ("pos1", "pos2", "dgmoe")


@dataclass
class ScMoELayerSubmodules(TransformerLayerSubmodules):
    """TransformerLayerSubmodules plus the routed path's own norm."""

    shortcut_layernorm: Union[ModuleSpec, type, None] = None


class ShortcutLink:
    """Hands block l's post-attention stream to the MoE block l+1 that reads it (one per pair).

    Both layers get the same link through their ModuleSpec params; the consumer registers itself
    at construction. It is a plain object, so the consumer is not registered twice as a module."""

    def __init__(self) -> None:
        self.consumer: Optional["ScMoELayer"] = None
        self.pending: Optional["RoutedPass"] = None

    def start(self, h_mh: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        """Called by block l right after its attention: start block l+1's routed path."""
        if self.consumer is None:
            raise RuntimeError("ScMoE shortcut link has no consumer layer; the block spec paired a "
                               "dense layer with no MoE layer after it.")
        self.pending = self.consumer.start_routed(h_mh, padding_mask)
        self.pending.at_slot(1)

    def take(self) -> Optional["RoutedPass"]:
        pending, self.pending = self.pending, None
        return pending


_SIDE_STREAM = None  # shared by all ScMoE layers: their side-stream work is issued in layer order anyway


def _side_stream() -> torch.cuda.Stream:
    global _SIDE_STREAM
    if _SIDE_STREAM is None:
        _SIDE_STREAM = torch.cuda.Stream()
    return _SIDE_STREAM


class RoutedPass:
    """One routed-MoE pass split as route+dispatch (side stream) / experts (main stream, at the
    chosen slot) / combine (side stream) / unpermute (main stream), on `dispatcher`."""

    def __init__(self, moe, dispatcher, x: torch.Tensor, padding_mask: Optional[torch.Tensor],
                 slot: int, exclude: Optional[torch.Tensor] = None, overlap: bool = True) -> None:
        """x [s, b, h]: the routed input (already normed); padding_mask [s, b], True = padding;
        exclude [s*b, E] bool: experts this pass may not choose (DGMoE's collision rule);
        overlap=False keeps everything on the current stream (the sequential baseline)."""
        self.moe, self.dispatcher, self.slot = moe, dispatcher, slot
        self.use_streams = x.is_cuda and overlap
        self.main = torch.cuda.current_stream() if self.use_streams else None
        self.side = _side_stream() if self.use_streams else None
        self.routing_map = None
        self._rows = self._probs = self._out = None
        self._computed = False
        if self.use_streams:
            # x (and the masks) come from the main stream and are read on the side stream: without
            # this, once the last reference goes (at once in evaluation; in training when the
            # side stream's backward releases its saved copy), the main stream could reuse their
            # memory before the side stream has read it
            for t in (x, padding_mask, exclude):
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.side)
        with self._on_side():
            with _excluding(moe.router, exclude):
                probs, routing_map = moe.router(x, padding_mask)
            self.routing_map = routing_map
            rows, row_probs = dispatcher.dispatch_preprocess(x, routing_map, probs)
            self._rows, self._probs = dispatcher.token_dispatch(rows, row_probs)

    @contextlib.contextmanager
    def _on_side(self):
        if not self.use_streams:
            yield
            return
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            yield

    def _join_main(self, *tensors: torch.Tensor) -> None:
        if self.use_streams:
            self.main.wait_stream(self.side)
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.main)

    def at_slot(self, slot: int) -> None:
        """Run the expert computation if `slot` is the chosen one."""
        if slot == self.slot and not self._computed:
            self.compute()

    def compute(self) -> None:
        self._computed = True
        self._join_main(self._rows, self._probs)
        d = self.dispatcher
        hidden, tokens_per_expert, probs = d.dispatch_postprocess(self._rows, self._probs)
        out, bias = self.moe.experts(hidden, tokens_per_expert, probs)
        if bias is not None:
            raise ValueError("ScMoE routed experts do not support expert biases; drop --add-bias-linear.")
        out = d.combine_preprocess(out)
        if self.use_streams:
            out.record_stream(self.side)
        with self._on_side():
            self._out = d.token_combine(out)
        self._rows = self._probs = None

    def finish(self) -> torch.Tensor:
        """Wait for the combine and unpermute: the routed output [s, b, h]."""
        if not self._computed:
            self.compute()
        self._join_main(self._out)
        out, self._out = self.dispatcher.combine_postprocess(self._out), None
        return out


@contextlib.contextmanager
def _excluding(router, exclude: Optional[torch.Tensor]):
    if exclude is None:
        yield
        return
    if not hasattr(router, "excluding"):
        raise TypeError(f"DGMoE needs a router that can exclude experts (the plugin's PolicyRouter), "
                        f"got {type(router).__name__}.")
    with router.excluding(exclude):
        yield


class ScMoEProducerLayer(TransformerLayer):
    """Dense block l of a Pos-2 pair: after its attention it starts block l+1's routed path."""

    def __init__(self, *args, shortcut_link: ShortcutLink, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shortcut_link = shortcut_link

    def forward(self, *args, **kwargs):
        hidden_states, context = self._forward_attention(*args, **kwargs)
        self.shortcut_link.start(hidden_states, _seq_first(kwargs.get("padding_mask")))
        output = self._forward_mlp(hidden_states, kwargs.get("inference_context"),
                                   padding_mask=kwargs.get("padding_mask"),
                                   packed_seq_params=kwargs.get("packed_seq_params"))
        return output, context


class ScMoELayer(TransformerLayer):
    """MoE block l+1 of ScMoE (pos1/pos2) or DGMoE: routed experts on the shortcut input.

    Params (from the spec): `scmoe_mode` in SCMOE_MODES; `shortcut_link` (None: the routed
    path reads this layer's own input, as Pos-1 does and as the first MoE layer of a Pos-2 model
    must); `expert_slot` ("auto" or 1-4)."""

    def __init__(self, config, submodules: ScMoELayerSubmodules, *args, scmoe_mode: str,
                 shortcut_link: Optional[ShortcutLink] = None, expert_slot: Any = "auto",
                 **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        if scmoe_mode not in SCMOE_MODES:
            raise ValueError(f"scmoe_mode must be one of {SCMOE_MODES}, got {scmoe_mode!r}.")
        if not self.is_moe_layer:
            raise ValueError("ScMoELayer needs an MoE layer spec (its mlp must be an MoELayer).")
        self.scmoe_mode = scmoe_mode
        # False: the same layer with every step on the current stream (benchmarks compare).
        self.overlap_comm = True
        self.shortcut_link = shortcut_link
        if shortcut_link is not None:
            shortcut_link.consumer = self
        self.shortcut_layernorm = build_module(submodules.shortcut_layernorm, config=self.config,
                                               hidden_size=self.config.hidden_size,
                                               eps=self.config.layernorm_epsilon)
        has_shared = getattr(self.mlp, "use_shared_expert", False)
        if scmoe_mode == "dgmoe" and has_shared:
            raise ValueError("DGMoE has no shared expert; unset --moe-shared-expert-intermediate-size.")
        if scmoe_mode != "dgmoe" and not has_shared:
            raise ValueError(f"ScMoE {scmoe_mode} needs a shared expert; set "
                             "--moe-shared-expert-intermediate-size.")
        # DGMoE's current pass runs while the previous pass's combine may still be in flight: it
        # needs its own dispatcher state (routing maps, splits), the experts are shared.
        self._current_dispatcher = None
        if scmoe_mode == "dgmoe":
            import copy

            self._current_dispatcher = copy.copy(self.mlp.token_dispatcher)
        slots = (1, 2, 3, 4) if shortcut_link is not None else (2, 3, 4)
        default = 2 if shortcut_link is not None else 3
        # every rank of the pipeline stage agrees on the slot: the router's TP x DP x CP group
        self.slot_chooser = SlotChooser(expert_slot, slots, default, name=f"layer {self.layer_number}",
                                        group=self.mlp.router.tp_dp_cp_group)

    # -- the routed path ------------------------------------------------------------------------
    def start_routed(self, routed_input: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> RoutedPass:
        """Norm + route + dispatch of `routed_input` [s, b, h] (padding_mask [s, b])."""
        x = self.shortcut_layernorm(routed_input)
        slot = self.slot_chooser.slot(self.training)
        self.slot_chooser.begin(x)
        return RoutedPass(self.mlp, self.mlp.token_dispatcher, x, padding_mask, slot,
                          overlap=self.overlap_comm)

    def forward(self, *args, **kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        padding_mask = _seq_first(kwargs.get("padding_mask"))
        if kwargs.get("packed_seq_params") is not None and getattr(
                kwargs["packed_seq_params"], "tokens_per_sample", None) is not None:
            raise NotImplementedError("ScMoE layers do not support packed sequences with "
                                      "tokens_per_sample (un-flattening for MoE) yet.")
        routed = self.shortcut_link.take() if self.shortcut_link is not None else None
        if routed is None:
            if self.shortcut_link is not None and self.training:
                raise RuntimeError("ScMoE: the dense layer before this MoE layer did not start its "
                                   "routed path (were the two layers split by recomputation or a "
                                   "pipeline stage boundary?).")
            routed = self.start_routed(hidden_states, padding_mask)
        routed.at_slot(2)
        h_mh, context = self._forward_attention(*args, **kwargs)
        routed.at_slot(3)
        x_cur = self._forward_pre_mlp_layernorm(h_mh)
        residual = h_mh
        if isinstance(x_cur, tuple):  # fused norm that also returns the residual
            x_cur, residual = x_cur
        if self.scmoe_mode == "dgmoe":
            current = RoutedPass(self.mlp, self._current_dispatcher, x_cur, padding_mask, slot=0,
                                 exclude=routed.routing_map, overlap=self.overlap_comm)
            other = current.finish()
        else:
            other = self.mlp.shared_experts(x_cur)
        routed.at_slot(4)
        out = routed.finish() + other
        self.slot_chooser.end(out)
        return self._forward_post_mlp((out, None), residual), context


def _seq_first(padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The block passes padding masks [b, s]; routers take [s, b] (as MoELayer.forward does)."""
    return None if padding_mask is None else padding_mask.transpose(0, 1).bool()
