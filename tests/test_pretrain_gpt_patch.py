"""patches/megatron-lm-core_v0.19.0-pretrain_gpt.patch: a well-formed unified diff of pretrain_gpt.py
whose added lines import and call the plugin functions that exist; with MEGATRON_LM_DIR pointing at a
Megatron-LM checkout (a work tree, or a git repository holding the core_v0.19.0 tag), it also applies
to that checkout's core_v0.19.0 pretrain_gpt.py and the result compiles."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PATCH = Path(__file__).resolve().parents[1] / "patches" / "megatron-lm-core_v0.19.0-pretrain_gpt.patch"
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
IMPORT = "from megatron_moe_ext.training.plugin import configure_model, extra_args_provider, finish_run"


def parse_unified_diff(text: str):
    """(old path, new path, hunks); each hunk is (old start, old count, new start, new count, lines).
    Raises AssertionError on anything a unified diff may not contain."""
    lines = text.splitlines()
    assert lines[0].startswith("--- ") and lines[1].startswith("+++ "), "missing ---/+++ header"
    old, new = lines[0][4:].split("\t")[0], lines[1][4:].split("\t")[0]
    hunks, i = [], 2
    while i < len(lines):
        m = HUNK.match(lines[i])
        assert m, f"line {i + 1}: expected a hunk header, got {lines[i]!r}"
        o_start, o_n, n_start, n_n = (int(g) if g is not None else 1 for g in m.groups())
        body, i = [], i + 1
        seen_old = seen_new = 0
        while i < len(lines) and (seen_old < o_n or seen_new < n_n):
            line = lines[i]
            tag = line[:1] if line else " "
            assert tag in " +-\\", f"line {i + 1}: bad line in hunk: {line!r}"
            if tag in " -":
                seen_old += 1
            if tag in " +":
                seen_new += 1
            body.append(line)
            i += 1
        assert (seen_old, seen_new) == (o_n, n_n), f"hunk at -{o_start}: counts {seen_old}/{seen_new} != {o_n}/{n_n}"
        hunks.append((o_start, o_n, n_start, n_n, body))
    return old, new, hunks


def test_patch_is_a_well_formed_diff_of_pretrain_gpt():
    old, new, hunks = parse_unified_diff(PATCH.read_text())
    assert (old, new) == ("a/pretrain_gpt.py", "b/pretrain_gpt.py")
    assert len(hunks) == 4
    # hunks in order, not overlapping, and each new start shifted by the lines added before it
    shift, end = 0, 0
    for o_start, o_n, n_start, n_n, _ in hunks:
        assert o_start > end and n_start == o_start + shift
        shift += n_n - o_n
        end = o_start + o_n - 1


def test_patch_imports_and_calls_plugin_functions_that_exist():
    import inspect

    from megatron_moe_ext.training import plugin

    _, _, hunks = parse_unified_diff(PATCH.read_text())
    added = [line[1:] for *_, body in hunks for line in body if line.startswith("+")]
    assert IMPORT in [a.strip() for a in added]
    for name in ("configure_model", "extra_args_provider", "finish_run"):
        assert callable(getattr(plugin, name)), name
    # the patch calls configure_model(args, model_cfg): those two are its required parameters
    params = inspect.signature(plugin.configure_model).parameters.values()
    assert [p.name for p in params if p.default is inspect.Parameter.empty] == ["args", "model_cfg"]
    code = "\n".join(a.strip() for a in added)
    assert "extra_args_provider=extra_args_provider(" in code
    assert "configure_model(args, model_cfg)" in code and "finish_run()" in code
    for a in added:                                  # every added line is valid Python on its own
        stripped = a.strip()
        if stripped.endswith(","):
            stripped = stripped[:-1]
        if stripped.startswith("extra_args_provider="):
            stripped = "f(" + stripped + ")"
        ast.parse(stripped)


def _checkout_file(root: Path, dest: Path) -> None:
    """core_v0.19.0's pretrain_gpt.py from MEGATRON_LM_DIR (the tag if the repository has it)."""
    git = subprocess.run(["git", "-C", str(root), "show", "core_v0.19.0:pretrain_gpt.py"],
                         capture_output=True, text=True)
    if git.returncode == 0:
        dest.write_text(git.stdout)
    elif (root / "pretrain_gpt.py").is_file():
        shutil.copy(root / "pretrain_gpt.py", dest)
    else:
        pytest.fail(f"MEGATRON_LM_DIR={root} has neither the core_v0.19.0 tag nor a pretrain_gpt.py")


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"),
                    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout to apply the patch for real")
def test_patch_applies_to_megatron_lm_core_v0_19_0(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    _checkout_file(Path(os.environ["MEGATRON_LM_DIR"]), tmp_path / "pretrain_gpt.py")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    check = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    patched = (tmp_path / "pretrain_gpt.py").read_text()
    tree = ast.parse(patched)
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "megatron_moe_ext.training.plugin"]
    assert [sorted(a.name for a in n.names) for n in imports] == [["configure_model", "extra_args_provider", "finish_run"]]
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"configure_model", "extra_args_provider", "finish_run"} <= calls
