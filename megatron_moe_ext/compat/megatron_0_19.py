"""Every patch the plugin applies to Megatron-Core, in one place, checked on megatron-core 0.19.2.

The plugin runs Megatron's own classes and training loop; where those need a change, it replaces
one module attribute at run time instead of forking the file. Each replacement is a `MegatronPatch`
entry in `PATCHES` below, with the reason Megatron needs it and the versions it was checked on, so a
Megatron upgrade is one file to re-check. `apply_patches(scope)` installs a scope's entries
(idempotent, the originals kept); `revert_patches(scope)` puts the originals back exactly.

Scopes:
  * "always": needed on every machine (the CPU layer and `configure_model` both apply them);
  * "cpu": only under the CPU compatibility layer (`compat/cpu.py`, which also patches *torch*);
  * "training": the run hooks' wrappers around `megatron.training.training`; their replacements
    are the training layer's code (`training/run_hooks.py`) and are passed in at install time, so
    this module imports nothing from the plugin's training layer.

A target is "module:attribute" (the attribute may be "Class.method"); a target without ":" names a
module that the patch places in `sys.modules` before Megatron imports it.

`patches_markdown_table()` renders the registry; docs/foundation.md holds its output (a test keeps
the two equal).
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import os
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple

import torch

Scope = Literal["always", "cpu", "training"]
SCOPES: Tuple[Scope, ...] = ("always", "cpu", "training")

# The plugin depends on megatron-core~=0.19.2; every entry below was checked on 0.19.2.
CHECKED_VERSIONS = ">=0.19.2,<0.20"

# Takes the attribute Megatron has now and returns what replaces it.
Replacement = Callable[[Any], Any]

_ABSENT = object()  # a module target that is not in sys.modules
_ORIGINALS: Dict[str, Dict[str, Any]] = {}  # patch name -> {target: what it replaced}
_VERSION_WARNED = False


class MegatronVersionWarning(UserWarning):
    """The installed megatron-core is outside the versions the patches were checked on."""


def _always_needed() -> bool:
    return True


@dataclass(frozen=True)
class MegatronPatch:
    """One replacement of a Megatron attribute, reversible."""

    name: str
    target: str
    reason: str
    scope: Scope
    versions: str = CHECKED_VERSIONS
    # None: the replacement is supplied to apply() (the run hooks).
    replace: Optional[Replacement] = None
    # Where Megatron bound the same object by name (`from x import f`): replaced alongside.
    aliases: Tuple[str, ...] = ()
    # False: this installation does not need the patch, and it is left out.
    needed: Callable[[], bool] = _always_needed

    @property
    def applied(self) -> bool:
        return self.name in _ORIGINALS

    def apply(self, replace: Optional[Replacement] = None) -> bool:
        """Install the replacement (a no-op if already installed). True if it is in place."""
        if self.applied:
            return True
        make = replace or self.replace
        if make is None:
            raise ValueError(f"Megatron patch {self.name!r} needs its replacement passed in.")
        if not self.needed():
            return False
        targets = (self.target, *self.aliases)
        originals = {t: _get(t) for t in targets}
        replacement = make(originals[self.target])
        for t in targets:
            _set(t, replacement)
        _ORIGINALS[self.name] = originals
        return True

    def revert(self) -> None:
        """Put back exactly the objects apply() replaced (a no-op if not installed)."""
        for t, original in _ORIGINALS.pop(self.name, {}).items():
            _set(t, original)


def _split(target: str) -> Tuple[Any, str]:
    """The object holding the target's last attribute, and that attribute's name."""
    module, _, path = target.partition(":")
    owner: Any = importlib.import_module(module)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


def _get(target: str) -> Any:
    if ":" not in target:
        return sys.modules.get(target, _ABSENT)
    owner, attr = _split(target)
    return getattr(owner, attr)


def _set(target: str, value: Any) -> None:
    if ":" not in target:
        if value is _ABSENT:
            sys.modules.pop(target, None)
        else:
            sys.modules[target] = value
        return
    owner, attr = _split(target)
    setattr(owner, attr, value)


# --------------------------------------------------------------------------------------------
# the replacements


def _no_compile_helpers(original: Callable) -> Callable:
    def compile_helpers() -> None:
        """The wheel's prebuilt helpers_cpp is used; there is nothing to compile."""

    return compile_helpers


def _wheel_has_no_makefile() -> bool:
    from megatron.core.datasets import utils as dataset_utils

    if os.path.exists(os.path.join(os.path.dirname(dataset_utils.__file__), "Makefile")):
        return False  # a Megatron-LM checkout: let it build
    # Nothing compiled either: leave it to Megatron to report.
    return importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None


def _pad_a_copy(original: Callable) -> Callable:
    @functools.wraps(original)
    def pad_routing_map(routing_map: torch.Tensor, pad_multiple: int) -> torch.Tensor:
        """`moe_utils.pad_routing_map` on a copy: [T, E] bool -> padded [T, E]; input unchanged."""
        return original(routing_map.clone(), pad_multiple)

    return pad_routing_map


def _paged_stash_stub(original: Any) -> types.ModuleType:
    # Only this module, not triton itself: a stub triton breaks torch.compile.
    stub = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*a: Any, **k: Any) -> None:
        raise RuntimeError("--moe-paged-stash needs triton and CUDA; it is unavailable on CPU.")

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    return stub


def _triton_missing() -> bool:
    if "megatron.core.transformer.moe.ops.paged_stash" in sys.modules:
        return False  # imported (or stubbed) already
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False


def _training_importable() -> bool:
    """megatron.training needs Python >= 3.12 and its optional dependencies."""
    try:
        import megatron.training.initialize  # noqa: F401
        import megatron.training.training  # noqa: F401
    except ImportError:
        return False
    return True


def _skip_jit_fusion_options(original: Callable) -> Callable:
    def set_jit_fusion_options(*args: Any, **kwargs: Any) -> None:
        """CPU: nothing to warm up (torch.compile is off under the CPU layer)."""

    return set_jit_fusion_options


def _allow_no_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_megatron(*args: Any, **kwargs: Any):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _cpu_rng_state_getter(original: Callable) -> Callable:
    return lambda *a, **k: torch.get_rng_state()


def _cpu_rng_state_setter(original: Callable) -> Callable:
    return lambda state, *a, **k: torch.set_rng_state(state)


def _placeholder_inference_rng_state(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_states(self):
        states = original(self)
        if not states and getattr(self, "is_inference_rng_tracker", False):
            states = {"cpu-compat-placeholder": torch.zeros(1, dtype=torch.uint8)}
        return states

    return get_states


def _sequence_parallel_torch_norm(original: Callable) -> Callable:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, *args: Any, **kwargs: Any):
        """`WrappedTorchNorm` that also builds under sequence parallelism, as TENorm and apex's
        FusedLayerNorm do: each TP rank normalises its own sequence shard, so the weight's
        gradient is a partial sum, and the `sequence_parallel` attribute makes
        `finalize_model_grads` all-reduce it over the TP group."""
        if not getattr(config, "sequence_parallel", False):
            return original(cls, config, hidden_size, eps, *args, **kwargs)
        # A shallow copy with the flag off passes Megatron's own assertion; the norm keeps no
        # reference to the config, and copying skips TransformerConfig's __post_init__.
        local = copy.copy(config)
        local.sequence_parallel = False
        norm = original(cls, local, hidden_size, eps, *args, **kwargs)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    return __new__


# --------------------------------------------------------------------------------------------
# the registry

_RANDOM = "megatron.core.tensor_parallel.random"

PATCHES: Tuple[MegatronPatch, ...] = (
    MegatronPatch(
        name="wheel-compile-helpers",
        target="megatron.core.datasets.utils:compile_helpers",
        reason="`initialize_megatron` runs `make` for the dataset index helper, but the wheel ships "
               "the compiled `helpers_cpp` and no Makefile, so stock `pretrain()` exits on every "
               "machine; a no-op when the prebuilt helper imports (a checkout is left alone).",
        scope="always",
        replace=_no_compile_helpers,
        needed=_wheel_has_no_makefile,
    ),
    MegatronPatch(
        name="router-padding-out-of-place",
        target="megatron.core.transformer.moe.token_dispatcher:pad_routing_map",
        reason="The alltoall dispatcher's FP8 padding (`--moe-router-padding-for-quantization`) "
               "writes into the router's routing map, which TE's fused top-k saved for backward, "
               "so every FP8 step fails in backward (docs/performance.md); padding a copy gives "
               "the same map.",
        scope="always",
        replace=_pad_a_copy,
    ),
    MegatronPatch(
        name="cpu-paged-stash-stub",
        target="megatron.core.transformer.moe.ops.paged_stash",
        reason="`megatron.core`'s import chain reaches this module, which imports triton "
               "unguarded, and CPU torch wheels ship no triton; a stub stands in when triton is "
               "missing (its kernels serve only the CUDA `--moe-paged-stash` feature).",
        scope="cpu",
        replace=_paged_stash_stub,
        needed=_triton_missing,
    ),
    MegatronPatch(
        name="cpu-recompute-rng-get",
        target=f"{_RANDOM}:_get_cuda_rng_state",
        reason="Activation recomputation saves \"the CUDA RNG state\" around each checkpointed "
               "chunk by reaching CUDA's generators directly; on CPU dropout draws from the CPU "
               "generator, so that is the state to save.",
        scope="cpu",
        replace=_cpu_rng_state_getter,
    ),
    MegatronPatch(
        name="cpu-recompute-rng-set",
        target=f"{_RANDOM}:_set_cuda_rng_state",
        reason="The restoring half of `cpu-recompute-rng-get`: recomputation restores the CPU "
               "generator's state.",
        scope="cpu",
        replace=_cpu_rng_state_setter,
    ),
    MegatronPatch(
        name="cpu-checkpoint-rng-placeholder",
        target=f"{_RANDOM}:CudaRNGStatesTracker.get_states",
        reason="On CPU the inference RNG tracker holds no states, and the checkpoint loader reads "
               "an empty tracker as \"no RNG state\" and exits; one placeholder state lets a resume "
               "restore the CPU, numpy and Python generators Megatron saves beside it.",
        scope="cpu",
        replace=_placeholder_inference_rng_state,
        needed=_training_importable,
    ),
    MegatronPatch(
        name="cpu-no-jit-fusion-options",
        target="megatron.training.initialize:set_jit_fusion_options",
        reason="`pretrain()` warms up the fused bias-activation and bias-dropout-add helpers on "
               "full-size CUDA activations; on CPU, with torch.compile off, that only costs "
               "start-up time.",
        scope="cpu",
        replace=_skip_jit_fusion_options,
        aliases=("megatron.training.training:set_jit_fusion_options",),
        needed=_training_importable,
    ),
    MegatronPatch(
        name="cpu-initialize-allow-no-cuda",
        target="megatron.training.initialize:initialize_megatron",
        reason="`initialize_megatron` asserts CUDA is available unless `allow_no_cuda=True`, "
               "which `pretrain()` never passes.",
        scope="cpu",
        replace=_allow_no_cuda,
        aliases=("megatron.training.training:initialize_megatron",),
        needed=_training_importable,
    ),
    MegatronPatch(
        name="cpu-sequence-parallel-torch-norm",
        target="megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",
        reason="Without TE or apex the local spec's norm is `WrappedTorchNorm`, which asserts "
               "`not sequence_parallel`, and Megatron needs sequence parallelism for MoE with "
               "TP > 1; on CPU the torch norm is built anyway and its parameters are marked "
               "`sequence_parallel`, so their gradients are all-reduced over the TP group as "
               "TENorm's and FusedLayerNorm's are.",
        scope="cpu",
        replace=_sequence_parallel_torch_norm,
    ),
    MegatronPatch(
        name="run-hook-train-step",
        target="megatron.training.training:train_step",
        reason="Router and FP8-cache state must advance once per optimizer step, outside any "
               "forward; `train_step` returns after the step on every rank, so its wrapper calls "
               "each module's `on_iteration_end` (mcore/iteration.py).",
        scope="training",
    ),
    MegatronPatch(
        name="run-hook-training-log",
        target="megatron.training.training:training_log",
        reason="The training loop has no per-iteration callback; `training_log` runs on every "
               "rank once per iteration, so its wrapper reports the `moe_ext/*` metrics and "
               "appends the losses to the run log.",
        scope="training",
    ),
    MegatronPatch(
        name="run-hook-evaluate",
        target="megatron.training.training:evaluate",
        reason="Validation and test losses come back from `evaluate`; its wrapper appends them "
               "to the run log, beside Megatron's own printing and logging.",
        scope="training",
    ),
    MegatronPatch(
        name="run-hook-evaluate-context",
        target="megatron.training.training:evaluate_and_print_results",
        reason="`evaluate` is not told the iteration or whether it is the test set; this wrapper "
               "records them for `run-hook-evaluate`.",
        scope="training",
    ),
)


def patch_named(name: str) -> MegatronPatch:
    """The registry entry called `name` (KeyError if there is none)."""
    for p in PATCHES:
        if p.name == name:
            return p
    raise KeyError(f"no Megatron patch named {name!r}")


def patches_in(scope: Scope) -> List[MegatronPatch]:
    if scope not in SCOPES:
        raise ValueError(f"unknown patch scope {scope!r}; one of {', '.join(SCOPES)}")
    return [p for p in PATCHES if p.scope == scope]


def apply_patches(scope: Scope, replacements: Optional[Mapping[str, Replacement]] = None
                  ) -> List[str]:
    """Install the scope's patches (idempotent); `replacements` maps an entry's name to its
    replacement where the registry has none. Returns the names in place afterwards."""
    replacements = replacements or {}
    entries = patches_in(scope)
    # Module stubs first: they must be in sys.modules before megatron is imported, which the
    # version check and the attribute patches do.
    stubs = [p for p in entries if ":" not in p.target]
    attributes = [p for p in entries if ":" in p.target]
    in_place = [p.name for p in stubs if p.apply(replacements.get(p.name))]
    if attributes:
        check_megatron_version()
    in_place += [p.name for p in attributes if p.apply(replacements.get(p.name))]
    return in_place


def revert_patches(scope: Scope) -> None:
    """Put back the originals of the scope's installed patches (in reverse registry order)."""
    for p in reversed(patches_in(scope)):
        p.revert()


def check_megatron_version() -> bool:
    """True if megatron-core is within every entry's checked range; warns once per process if not.

    `megatron.core.__version__` comes from `megatron.core.package_info` (0.19.2 appends the
    git hash as a local version, "0.19.2+<hash>", which the range accepts as 0.19.2).
    """
    global _VERSION_WARNED
    import megatron.core
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = megatron.core.__version__
    try:
        parsed: Optional[Version] = Version(version)
    except InvalidVersion:
        parsed = None  # unknown: every range counts as missed
    outside = sorted({p.versions for p in PATCHES
                      if parsed is None or not SpecifierSet(p.versions).contains(parsed,
                                                                                  prereleases=True)})
    if outside and not _VERSION_WARNED:
        _VERSION_WARNED = True
        warnings.warn(
            f"megatron-core {version} is outside the versions the plugin's Megatron patches were "
            f"checked on ({'; '.join(outside)}): re-check megatron_moe_ext/compat/megatron_0_19.py "
            "against this version.", MegatronVersionWarning, stacklevel=2)
    return not outside


def patches_markdown_table() -> str:
    """The registry as the markdown table docs/foundation.md shows."""
    rows = ["| patch | target | scope | checked on | why |", "|---|---|---|---|---|"]
    for p in PATCHES:
        target = " + ".join(f"`{t}`" for t in (p.target, *p.aliases))
        rows.append(f"| `{p.name}` | {target} | {p.scope} | `{p.versions}` | {p.reason} |")
    return "\n".join(rows) + "\n"
