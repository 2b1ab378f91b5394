"""Every file and `module.name` a doc or docstring points to exists: a rename that leaves a
reference behind fails here, not in a reader's afternoon."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "linfusion_cli"
UNITS = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
         if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("_")}
FILE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md|yaml|json))\b")
DOTTED = re.compile(r"(?<![\w./])((?:linfusion_cli\.)?([a-z_]+)(?:\.[A-Za-z_][\w]*)+)")
EXTERNAL = {"comfy/latent_formats.py"}  # another project's file, named as a source
TOP = {p.name for p in ROOT.iterdir() if p.is_dir()}


def _texts():
    """(where, text, folder a relative name starts from) for README, docs/ and every docstring
    (not the CHANGELOG: its entries name files as they were then)."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        yield path.relative_to(ROOT), path.read_text(), path.parent
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}", doc, path.parent


def _ours(name: str) -> bool:
    """Source and docs, or a path under one of the project's folders (not a model's config.json)."""
    return name not in EXTERNAL and (name.endswith((".py", ".md")) or name.split("/")[0] in TOP)


def _file_exists(name: str, folder: Path) -> bool:
    bases = [ROOT, PACKAGE, folder, folder.parent, ROOT / "docs"]
    if any((base / name).exists() for base in bases):
        return True
    # a bare file name, or a path inside a sub-package named from above: somewhere in the
    # project's own folders (not a virtual environment's packages)
    return any(p for top in (ROOT / t for t in TOP if not t.startswith(".")) for p in top.glob(f"**/{name}"))


def _resolves(dotted: str) -> bool:
    parts = dotted.removeprefix("linfusion_cli.").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("linfusion_cli." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_file_references_resolve():
    missing = [f"{where}: {name}" for where, text, folder in _texts() for name in FILE.findall(text)
               if _ours(name) and not _file_exists(name, folder)]
    assert missing == []


def test_module_references_resolve():
    missing = []
    for where, text, _ in _texts():
        for dotted, head in DOTTED.findall(re.sub(r"`[^`]*\(\)`", "", text)):
            if head in UNITS and dotted.count(".") >= 1 and not dotted.endswith((".py", ".md")):
                if not _resolves(dotted.rstrip(".")):
                    missing.append(f"{where}: {dotted}")
    assert missing == []
