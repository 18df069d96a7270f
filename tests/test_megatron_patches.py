"""The patch registry (compat/megatron_0_19.py) on the real Megatron modules: applying is
idempotent, reverting puts back the very objects it replaced, the version check warns once, and
the docs show the registry."""

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

from megatron_moe_ext.compat import megatron_0_19 as registry

ROOT = Path(__file__).resolve().parents[1]


def _targets(p):
    return {t: registry._get(t) for t in (p.target, *p.aliases)}


@pytest.mark.parametrize("scope", ["always", "cpu"])
def test_apply_is_idempotent_and_revert_restores_the_originals(megatron_cpu, scope):
    entries = registry.patches_in(scope)
    registry.revert_patches(scope)  # the CPU layer installed them for the session
    originals = {p.name: _targets(p) for p in entries}
    try:
        applied = registry.apply_patches(scope)
        assert applied == [p.name for p in entries if p.applied] and applied
        installed = {p.name: _targets(p) for p in entries}
        for name in applied:
            assert all(installed[name][t] is not originals[name][t] for t in installed[name])
        assert registry.apply_patches(scope) == applied
        assert all(registry._get(t) is obj for p in entries for t, obj in installed[p.name].items())
        registry.revert_patches(scope)
        assert not any(p.applied for p in entries)
        assert all(registry._get(t) is obj for p in entries for t, obj in originals[p.name].items())
    finally:
        registry.apply_patches(scope)


def test_revert_leaves_megatron_attributes_as_they_were(megatron_cpu):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    from megatron.training import initialize, training

    registry.revert_patches("always")
    registry.revert_patches("cpu")
    stock_get_states = CudaRNGStatesTracker.get_states
    stock_init = initialize.initialize_megatron
    try:
        assert token_dispatcher.pad_routing_map is moe_utils.pad_routing_map
        assert training.initialize_megatron is stock_init
        registry.apply_patches("cpu")
        registry.apply_patches("always")
        assert token_dispatcher.pad_routing_map is not moe_utils.pad_routing_map
        assert CudaRNGStatesTracker.get_states.__wrapped__ is stock_get_states
        assert training.initialize_megatron is initialize.initialize_megatron is not stock_init
        registry.revert_patches("always")
        registry.revert_patches("cpu")
        assert token_dispatcher.pad_routing_map is moe_utils.pad_routing_map
        assert CudaRNGStatesTracker.get_states is stock_get_states
        assert training.initialize_megatron is initialize.initialize_megatron is stock_init
    finally:
        registry.apply_patches("cpu")
        registry.apply_patches("always")


def test_run_hooks_are_installed_and_removed_through_the_registry(megatron_cpu):
    from megatron.training import training as mt_training

    from megatron_moe_ext.training.run_hooks import RUN_HOOK_WRAPPERS

    names = ["training_log", "evaluate", "evaluate_and_print_results"]
    was_applied = registry.patch_named("run-hook-training-log").applied
    registry.revert_patches("training")
    stock = {n: getattr(mt_training, n) for n in names}
    try:
        with pytest.raises(ValueError, match="needs its replacement passed in"):
            registry.apply_patches("training")
        assert registry.apply_patches("training", RUN_HOOK_WRAPPERS) == list(RUN_HOOK_WRAPPERS)
        wrapped = {n: getattr(mt_training, n) for n in names}
        assert all(wrapped[n].__wrapped__ is stock[n] for n in names)
        registry.apply_patches("training", RUN_HOOK_WRAPPERS)
        assert all(getattr(mt_training, n) is wrapped[n] for n in names)
        registry.revert_patches("training")
        assert all(getattr(mt_training, n) is stock[n] for n in names)
    finally:
        if was_applied:
            registry.apply_patches("training", RUN_HOOK_WRAPPERS)


@pytest.mark.parametrize("version", ["0.20.1", "0.19.0", "unknown"])
def test_a_megatron_outside_the_checked_range_warns_once(megatron_cpu, monkeypatch, version):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", version)
    monkeypatch.setattr(registry, "_VERSION_WARNED", False)
    with pytest.warns(registry.MegatronVersionWarning,
                      match=rf"megatron-core {re.escape(version)} is outside .* "
                            r"\(>=0\.19\.2,<0\.20\)"):
        registry.apply_patches("always")
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.MegatronVersionWarning)
        registry.apply_patches("always")
        assert registry.check_megatron_version() is False


@pytest.mark.parametrize("version", [None, "0.19.2", "0.19.9rc1"])
def test_a_megatron_inside_the_checked_range_does_not_warn(megatron_cpu, monkeypatch, version):
    import megatron.core

    if version is not None:  # None: the installed one ("0.19.2+<git hash>")
        monkeypatch.setattr(megatron.core, "__version__", version)
    monkeypatch.setattr(registry, "_VERSION_WARNED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.MegatronVersionWarning)
        assert registry.check_megatron_version() is True
        registry.apply_patches("always")


def test_the_docs_table_is_the_registry():
    text = (ROOT / "docs" / "foundation.md").read_text()
    table = re.search(r"<!-- patches-table -->\n(.*?)<!-- /patches-table -->", text, re.S)
    assert table, "docs/foundation.md lost its patches table markers"
    assert table.group(1) == registry.patches_markdown_table()


def test_the_registry_does_not_import_the_training_layer():
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("megatron_moe_ext")]


def test_every_entry_is_documented_and_names_are_unique():
    names = [p.name for p in registry.PATCHES]
    assert len(names) == len(set(names))
    for p in registry.PATCHES:
        assert p.scope in registry.SCOPES and p.reason and p.versions


STUB_CHECK = """
import sys
sys.modules["triton"] = None  # as on a CPU torch wheel: `import triton` raises ImportError
from megatron_moe_ext.compat.cpu import enable_cpu_compat
enable_cpu_compat()
import megatron.core.transformer.moe.token_dispatcher  # reaches paged_stash
from megatron_moe_ext.compat.megatron_0_19 import patch_named
name = "megatron.core.transformer.moe.ops.paged_stash"
stub, patch = sys.modules[name], patch_named("cpu-paged-stash-stub")
assert patch.applied and stub.GLOBAL_BLOCK_SIZE == 1024
patch.revert()
assert name not in sys.modules
"""


def test_without_triton_the_cpu_layer_stubs_paged_stash_and_revert_removes_the_stub():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", STUB_CHECK], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cpu_torch_norm_builds_under_sequence_parallelism_with_marked_parameters(megatron_cpu):
    """Without TE or apex the local spec's norm refuses sequence parallelism; under the CPU layer
    it builds, and its parameters carry `sequence_parallel` so that `finalize_model_grads` sums
    their gradients over the TP group. Without sequence parallelism nothing is marked."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = megatron_cpu.moe_config(normalization="RMSNorm")
    plain = WrappedTorchNorm(cfg, cfg.hidden_size)
    assert not any(hasattr(p, "sequence_parallel") for p in plain.parameters())
    cfg.sequence_parallel = True  # as at TP > 1 (this process has TP 1, which the config refuses)
    norm = WrappedTorchNorm(cfg, cfg.hidden_size, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert [getattr(p, "sequence_parallel", None) for p in norm.parameters()] == [True]
    assert cfg.sequence_parallel  # the caller's config is untouched
    registry.patch_named("cpu-sequence-parallel-torch-norm").revert()
    try:
        with pytest.raises(AssertionError, match="sequence parallel not supported"):
            WrappedTorchNorm(cfg, cfg.hidden_size)
    finally:
        registry.apply_patches("cpu")
