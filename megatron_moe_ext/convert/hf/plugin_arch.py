"""The plugin's own HF architectures (`modeling_moe_ext.py`): which one a Megatron run needs, and
its config.

Choices (docs/hf.md says the same):
* topk: a stock architecture (arch.py), no remote code.
* locmoe: a stock architecture too. LocMoE changes training (a locality loss, a GrAP-started
  gate); its selection is top-k over the trained gate. Its node-local bias needs EP ranks on
  nodes, which inference has not: on one node every expert is local, the bias is uniform and
  changes nothing, so the HF model is the Megatron model evaluated on one node. Its capacity
  bound drops tokens of a training batch; inference is dropless.
* c2r: Qwen3-MoE or Mixtral with C2R's router (`moe_ext_c2r_partners`, expert slots as exported:
  a placement applied by apply-placement is carried in the partners, not undone, so the HF model
  computes the same function with the experts in their slots).
* locmoe-plus: Qwen3-MoE or Mixtral with LocMoE+'s token choice, dropless (the expert-choice
  capacity is a property of a training batch).
* scmoe pos1/pos2/dgmoe: Qwen2-MoE with the shortcut wiring (`moe_ext_shortcut_sources`).
`--routing topk` exports C2R/LocMoE+ weights as the stock architecture with plain top-k; it
cannot undo ScMoE's wiring, so it is refused there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from megatron_moe_ext.errors import UserError

MODELING_FILE = Path(__file__).with_name("modeling_moe_ext.py")

_CLASSES = {  # (variant family, base arch) -> class name prefix in modeling_moe_ext
    ("policy", "qwen3_moe"): "MoeExtQwen3Moe",
    ("policy", "mixtral"): "MoeExtMixtral",
    ("scmoe", "qwen2_moe"): "MoeExtScMoE",
}


def plugin_variant(args: Any, routing: str) -> Optional[str]:
    """'c2r' | 'locmoe-plus' | 'scmoe' when the run needs the plugin's modeling file, else None."""
    policy = getattr(args, "moe_router_policy", "topk") or "topk"
    scmoe = getattr(args, "moe_scmoe", "off") or "off"
    if scmoe != "off":
        if routing == "topk":
            raise UserError(f"--routing topk: --moe-scmoe {scmoe} changes the layer wiring, which plain "
                            "top-k routing cannot undo; export with --routing native.")
        if policy != "topk":
            raise UserError(f"--moe-router-policy {policy} with --moe-scmoe {scmoe} has no exported "
                            "architecture yet; export a model trained with one of them.")
        return "scmoe"
    if routing == "topk" or policy in ("topk", "locmoe"):
        return None
    return policy


def base_check(variant: Optional[str], arch: str) -> None:
    """The base architectures each variant is built on; refuse the others."""
    if variant in ("c2r", "locmoe-plus") and arch not in ("qwen3_moe", "mixtral"):
        raise UserError(f"--moe-router-policy {variant} with a shared expert has no exported architecture "
                        "yet (C2R and LocMoE+ are built on Qwen3-MoE and Mixtral).")


def config(args: Any, arch: str, variant: str, kwargs: Dict[str, Any],
           read_layer: Callable[[str, int], Any], moe_layers: List[int]):
    """The transformers config of the variant: the base's fields plus the policy's or wiring's.
    read_layer(local key, layer) -> the layer's tensor or None (for C2R's learned partners)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("modeling_moe_ext", MODELING_FILE)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    family = "scmoe" if variant == "scmoe" else "policy"
    prefix = _CLASSES[(family, arch)]
    kw = dict(kwargs)
    kw["architectures"] = [f"{prefix}ForCausalLM"]
    kw["auto_map"] = {"AutoConfig": f"modeling_moe_ext.{prefix}Config",
                      "AutoModelForCausalLM": f"modeling_moe_ext.{prefix}ForCausalLM"}
    if variant == "scmoe":
        from megatron_moe_ext.mcore.scmoe_spec import scmoe_shortcut_sources

        sources = scmoe_shortcut_sources(list(moe_layers), args.moe_scmoe)
        kw.update(moe_ext_scmoe=args.moe_scmoe, moe_ext_shortcut_sources={str(k): v for k, v in sources.items()})
    elif variant == "c2r":
        kw.update(moe_ext_policy="c2r", moe_ext_c2r_partners=c2r_partners(args, read_layer, moe_layers))
    else:
        kw.update(moe_ext_policy="locmoe-plus", moe_ext_locmoe_plus_tau=float(args.moe_locmoe_plus_tau))
    return getattr(m, f"{prefix}Config")(**kw)


def c2r_partners(args: Any, read_layer: Callable[[str, int], Any], moe_layers: List[int]) -> Dict[str, list]:
    """{str(HF layer index): [[partner slots] per expert slot]}: what the run's C2R routers used.
    From the checkpoint after a warm-up (learned partners; a warm-up that did not finish routed
    plain top-k, so every other expert is a partner), else from the plan the run named, else the
    default lists of its EP layout."""
    from megatron_moe_ext.routing.collaboration import default_partner_lists
    from megatron_moe_ext.routing.policies.c2r import resolve_top_t
    from megatron_moe_ext.routing.topology import EPTopology

    E, k = args.num_experts, args.moe_router_topk
    ep = getattr(args, "moe_c2r_layout_ep", None) or args.expert_model_parallel_size
    topo = EPTopology(E, ep, ep)
    out = {}
    plan = None
    if getattr(args, "moe_c2r_plan", None) and not getattr(args, "moe_c2r_warmup_steps", 0):
        from megatron_moe_ext.files.plan import PlanError, load_plan

        try:
            plan = load_plan(args.moe_c2r_plan, num_experts=E, topk=k)
        except PlanError as e:
            raise UserError(f"the run's --moe-c2r-plan cannot be read here ({e}); its partner lists are "
                            "part of the model, so export where the plan file is.") from None
    for layer, is_moe in enumerate(moe_layers):
        if not is_moe:
            continue
        if getattr(args, "moe_c2r_warmup_steps", 0):
            partners, active = read_layer("mlp.router.c2r_partners", layer), read_layer("mlp.router.c2r_active", layer)
            if partners is None or active is None:
                raise UserError(f"the checkpoint has no C2R warm-up partners for layer {layer}, which its "
                                "saved args (--moe-c2r-warmup-steps) imply.")
            rows = partners.tolist() if int(active.reshape(-1)[0]) == 1 else \
                default_partner_lists(topo, E - 1).tolist()
        elif plan is not None:
            if layer + 1 not in plan.partners:
                raise UserError(f"{plan.path} has no partner lists for MoE layer {layer + 1}.")
            rows = plan.partners[layer + 1].tolist()
        else:
            rows = default_partner_lists(topo, resolve_top_t(getattr(args, "moe_c2r_top_t", None), topo, k)).tolist()
        out[str(layer)] = rows
    return out


def write_modeling_file(folder: Path) -> None:
    """Ship the modeling file beside config.json (it names it in auto_map)."""
    shutil.copy2(MODELING_FILE, Path(folder) / MODELING_FILE.name)
