"""Imports flow one way: no cycles among ernie_jax's modules, and no function-level import of one
of its own modules (the usual way to hide a cycle) outside the few entry points that need one."""

import ast
import os

import ernie_jax

ROOT = os.path.dirname(ernie_jax.__file__)
# entry points whose late imports are deliberate: aot sets up TPU topology flags before importing jax;
# the package's own __init__ keeps `import ernie_jax.<module>` light (load_pretrained pulls convert)
LATE_IMPORTS_ALLOWED = {"ernie_jax", "ernie_jax.aot", "ernie_jax.convert.__main__"}


def _modules() -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                mod = "ernie_jax." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[mod.removesuffix(".__init__")] = path
    return out


def _imports(mod: str, path: str, modules: dict) -> list[tuple[str, bool]]:
    """(imported module, at top level) for every import of an ernie_jax module. `from pkg import sub`
    names the submodule; a module's own parent packages are not edges (they load first anyway)."""
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [base] + subs
        for t in targets:
            if t in modules and t != mod and not mod.startswith(t + "."):
                out.append((t, id(node) in top))
    return out


def test_no_import_cycles_and_no_late_imports_of_our_modules():
    modules = _modules()
    edges = {m: set() for m in modules}
    late = []
    for mod, path in modules.items():
        for target, at_top in _imports(mod, path, modules):
            edges[mod].add(target)
            if not at_top and mod not in LATE_IMPORTS_ALLOWED:
                late.append(f"{mod} -> {target}")
    assert not late, f"function-level imports of ernie_jax modules: {sorted(set(late))}"
    state, stack = {}, []

    def visit(m):  # depth-first; a grey node met again closes a cycle
        state[m] = "grey"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "grey":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "black"

    for m in sorted(edges):
        if m not in state:
            visit(m)
