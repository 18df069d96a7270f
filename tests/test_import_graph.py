"""The package's imports run one way: user surface -> workflows -> Megatron adapters -> routing math.

Every `import`/`from ... import` of a `megatron_moe_ext` module is read from the source (module
level and inside functions alike: a lazy import is still a dependency), giving a graph of the
package's modules. It must have no cycle, no edge may point to a higher layer, and `routing/`
must import neither Megatron nor argparse.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "megatron_moe_ext"

# Layers, lowest first: a module may import its own layer or lower ones only.
LAYERS = [
    ("errors",),
    ("routing", "files", "kernels"),
    ("config",),
    ("compat", "mcore", "experts"),
    ("args", "training", "convert", "plots"),
    ("commands", "cli"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its folder {top!r} has no layer in tests/test_import_graph.py")


def _imports(path: Path):
    """(imported module, line) for every import in the file, package-internal or not."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod, node.lineno
            for a in node.names:  # `from pkg import module`
                yield f"{mod}.{a.name}", node.lineno


def _graph():
    files = sorted(p for p in PKG.rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        deps = set()
        for mod, line in _imports(path):
            if mod in modules and mod != name:
                deps.add((mod, line))
        edges[name] = deps
    return modules, edges


def test_no_import_points_to_a_higher_layer():
    modules, edges = _graph()
    upward = [f"{a}:{line} imports {b}" for a, deps in edges.items() for b, line in deps
              if a != "megatron_moe_ext" and b != "megatron_moe_ext" and _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycle():
    _, edges = _graph()
    adj = {a: {b for b, _ in deps} for a, deps in edges.items()}
    # a package imports its own __init__ when a submodule is imported: not a dependency edge
    for a in adj:
        adj[a] = {b for b in adj[a] if not a.startswith(b + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(adj.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(adj):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("forbidden", ["megatron", "argparse"])
def test_routing_imports_neither_megatron_nor_argparse(forbidden):
    bad = [f"{p.relative_to(PKG)}:{line} imports {mod}" for p in sorted((PKG / "routing").rglob("*.py"))
           for mod, line in _imports(p) if mod == forbidden or mod.startswith(forbidden + ".")]
    assert not bad, "\n".join(bad)
