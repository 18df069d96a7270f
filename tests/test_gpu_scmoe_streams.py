"""ScMoE's routed path on its side stream, in evaluation, on the GPU (marker `gpu`).

The study's `scmoe-pos2-c2r` run at seed 1235 (docs/results.md) trained normally but evaluated
erratically (validation 3.80, then 4.93 at the next evaluation, while its training loss stayed
below top-k's). A cause found in the code: the routed input is made on the main stream and read
by the side stream's router and permutation; in evaluation nothing else holds it, so the main
stream could reuse its memory before the side stream had read it (training keeps it alive for the
backward). Since then `RoutedPass` records it on the side stream. Here the Pos-2 block with its
streams must give, in evaluation, what the same block gives with everything on one stream, on
fresh inputs, with allocations between forwards that would take freed memory. A race need not
show on every run, so a pass is evidence, not proof; a failure is a bug.

Tolerance: the same kernels on the same inputs in the same order per stream: 1e-5 of the max.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (streams)")]

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def megatron_gpu():
    sys.path.insert(0, BENCH)
    from gpu_setup import init_single_gpu_megatron

    if not torch.distributed.is_initialized():
        init_single_gpu_megatron(port=29519)


def _block(policy: str, dedup: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.experts import torch_experts
    from megatron_moe_ext.mcore.scmoe_spec import apply_scmoe
    from megatron_moe_ext.mcore.specs import moe_layer_class_for, replace_moe_submodules, router_class_for

    cfg = TransformerConfig(
        num_layers=4, moe_layer_freq=[0, 1, 0, 1], hidden_size=512, ffn_hidden_size=1024,
        num_attention_heads=8, num_moe_experts=8, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", add_bias_linear=False,
        moe_shared_expert_intermediate_size=512, moe_shared_expert_gate=True,
        hidden_dropout=0.0, attention_dropout=0.0, moe_permute_fusion=False, moe_router_fusion=False,
        bias_activation_fusion=False, gradient_accumulation_fusion=False)
    ext = MoEExtConfig(router_policy=policy, scmoe="pos2", dedup_dispatch=dedup, expert_backend="torch")
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="LayerNorm")
    subs = {"experts": torch_experts}
    if router_class_for(ext) is not None:
        subs["router"] = router_class_for(ext)
    spec = replace_moe_submodules(spec, layer_cls=moe_layer_class_for(ext), **subs)
    return TransformerBlock(cfg, apply_scmoe(spec, ext, cfg)).cuda().eval()


@pytest.mark.parametrize("policy,dedup", [("topk", False), ("c2r", True)], ids=["topk", "c2r-dedup"])
def test_eval_with_the_side_stream_equals_one_stream(megatron_gpu, policy, dedup):
    from megatron_moe_ext.mcore.scmoe_layer import ScMoELayer

    torch.manual_seed(0)
    block = _block(policy, dedup)
    scmoe_layers = [m for m in block.modules() if isinstance(m, ScMoELayer)]
    assert scmoe_layers
    g = torch.Generator(device="cuda").manual_seed(1)
    mask = torch.triu(torch.ones(256, 256, dtype=torch.bool, device="cuda"), 1).view(1, 1, 256, 256)
    with torch.no_grad():
        for i in range(12):
            x = torch.randn(256, 8, 512, device="cuda", generator=g)
            outs = []
            for overlap in (True, False):
                for m in scmoe_layers:
                    m.overlap_comm = overlap
                y = block(hidden_states=x, attention_mask=mask)
                y = y[0] if isinstance(y, tuple) else y
                # allocations that take whatever the forward freed, written at once
                churn = [torch.full((256, 8, 512), float("nan"), device="cuda") for _ in range(8)]
                outs.append(y.clone())
                del churn
            torch.cuda.synchronize()
            err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
            assert err <= 1e-5, (i, err)
