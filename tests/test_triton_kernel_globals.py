"""Every Triton kernel of the package reads only globals that a compiled kernel may read.

The CPU tests run the kernels under TRITON_INTERPRET=1, which reads any Python global; Triton's
compiler accepts only modules (tl, triton), other jit functions and globals made with
`tl.constexpr(...)`. A plain float constant passed every interpreted test and failed every
compiled one on the GPU (the weighted GELU's 1/sqrt(2), layer-speed run 5). This test finds such a
name statically, from the source, without a GPU."""

import ast
import builtins
import importlib
import pathlib
import types

import pytest

triton = pytest.importorskip("triton")
tl = triton.language

PKG = pathlib.Path(__file__).resolve().parent.parent / "megatron_moe_ext"


def _is_jit(dec: ast.expr) -> bool:
    f = dec.func if isinstance(dec, ast.Call) else dec
    return isinstance(f, ast.Attribute) and f.attr == "jit" or isinstance(f, ast.Name) and f.id == "jit"


def _kernels():
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                yield path, node


def _free_names(fn: ast.FunctionDef) -> set:
    bound = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    loads = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return loads - bound


def _allowed(value) -> bool:
    return isinstance(value, (types.ModuleType, tl.constexpr, triton.runtime.JITFunction))


def test_kernels_were_found():
    names = {fn.name for _, fn in _kernels()}
    want = {"_router_fwd_kernel", "_weighted_act_bwd_kernel", "_gather_sum_kernel", "_row_gather_kernel", "_kl_kernel"}
    assert want <= names, names


def _id(v) -> str:
    return v.name if isinstance(v, pathlib.Path) else getattr(v, "name", "")


@pytest.mark.parametrize("path,fn", list(_kernels()), ids=_id)
def test_kernel_reads_only_compilable_globals(path, fn):
    module = importlib.import_module(".".join(path.relative_to(PKG.parent).with_suffix("").parts))
    bad = []
    for name in sorted(_free_names(fn)):
        if hasattr(builtins, name):
            continue   # range, min, float...: Triton's front end handles the builtins it supports
        if not hasattr(module, name):
            bad.append(f"{name} (not a global of {module.__name__})")
        elif not _allowed(getattr(module, name)):
            bad.append(f"{name} = {getattr(module, name)!r} (make it tl.constexpr(...))")
    assert not bad, f"{path.name}:{fn.lineno} {fn.name} reads globals a compiled kernel cannot: {bad}"
