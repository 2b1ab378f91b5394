"""The package reads in layers: every import (inside functions too) points downward, no two files
import each other (directly or around a loop), and imports inside functions say why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "linfusion_cli"
CORE = ("__init__", "errors", "validate", "bounds", "inputs", "figures", "hostmem", "interrupts", "differences",
        "testhooks", "hub", "schema", "gpus")
# top to bottom; a unit may import its own files, anything in a lower layer, never upward or sideways
LAYERS = (("__main__",), ("cli",), ("api",), ("jobs", "progress_json"), ("tracing",), ("pipeline",), ("planning",), ("models",),
          ("adapters",), ("attention", "vae", "parallel"), ("bands",), ("runtime",), ("io",), CORE)
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}
# Imported inside functions, on purpose: each takes seconds or is optional/platform-bound, and
# planning, --help and --dry-run never need them (diffusers alone adds ~5 s to every command).
LATE = {"diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "scipy", "psutil",
        "fcntl", "pwd", "typer", "rich"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The sub-package (or root module) a module belongs to: its place in LAYERS."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _target(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """(file, line, importing module, imported module, inside a function, has a comment)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _target(node, path)
                targets = [f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                           or (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).is_dir() else base
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            span = lines[node.lineno - 2:node.end_lineno]
            commented = any("#" in line for line in span)
            for target in targets:
                if target == "linfusion_cli" or target.startswith("linfusion_cli."):
                    yield path, node.lineno, _module(path), target, id(node) in in_function, commented


def test_every_unit_has_a_layer():
    units = {_unit(_module(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYER_OF), f"place these in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_point_downward():
    wrong = []
    for path, line, source, target, _, _ in _imports():
        a, b = _unit(source), _unit(target)
        if a != b and (LAYER_OF[b] < LAYER_OF[a] or (LAYER_OF[b] == LAYER_OF[a] and a not in CORE)):
            wrong.append(f"{path.relative_to(PACKAGE)}:{line}: {a} -> {b}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_loops_between_files():
    graph: dict[str, set[str]] = {}
    for _, _, source, target, _, _ in _imports():
        if source != target and not source.startswith(target + "."):  # a package's own files
            graph.setdefault(source, set()).add(target)
    loops = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert not loops, f"files that import each other: {loops}"


def test_imports_inside_functions_say_why():
    silent = [f"{path.relative_to(PACKAGE)}:{line}" for path, line, _, _, inside, commented in _imports()
              if inside and not commented]
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)


def test_only_late_packages_are_imported_inside_functions():
    """Anything else belongs at the top of its module, where a reader looks for it."""
    early = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                if id(node) not in guarded and any(n.split(".")[0] not in LATE for n in names):
                    early.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {', '.join(names)}")
    assert not early, "imports to move to the module's top:\n" + "\n".join(early)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the loops of the import graph."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    nodes = set(graph) | {t for ts in graph.values() for t in ts}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out
