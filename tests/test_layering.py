"""The package's imports only go downward, and no two subpackages import each other (directly or in a cycle).

Layers, bottom to top (docs/architecture.md):
  schemas  <  io (on-disk format, storage, readers, writers)  <  labelers  <  tokenize
  <  pipeline (execution) | dataset (the trainer-side reader)  <  jobs  <  cli
Every ``import`` statement counts, including those inside functions (lazy imports still tie the layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "modalmill"

LAYERS = {
    "": 0,  # modalmill/__init__.py: the version and lazy names only
    "schemas": 0,
    "io": 1,
    "labelers": 2,
    "tokenize": 3,
    "pipeline": 4,
    "dataset": 4,
    "jobs": 5,
    "cli": 6,
    "__main__": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every modalmill import in ``source`` (``module`` is the importer)."""
    out = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "modalmill"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "modalmill":
                continue
            if node.module is None or target == "modalmill":  # `from . import x` / `from modalmill import x`
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def subpackage(module: str) -> str:
    """``modalmill.io.storage`` -> ``io``; ``modalmill.cli`` -> ``cli``; ``modalmill`` -> ``""``."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    sub = parts[1]
    return sub if sub in LAYERS else ""  # `from modalmill import __version__`


def violations(files: dict[str, tuple[str, bool]]) -> tuple[list[str], dict[str, set[str]]]:
    """Imports that go up a layer or sideways between two subpackages of one layer, and the subpackage graph."""
    bad, graph = [], {}
    for module, (source, is_package) in sorted(files.items()):
        src = subpackage(module)
        for line, target in imports_of(source, module, is_package):
            dst = subpackage(target)
            if dst == src:
                continue
            graph.setdefault(src, set()).add(dst)
            if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and dst and src):
                bad.append(f"{module}:{line} imports {target} ({src or 'modalmill'} -> {dst}: not downward)")
    return bad, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {_module_name(p): (p.read_text(), p.name == "__init__.py") for p in PKG.rglob("*.py")}


def test_every_subpackage_has_a_layer():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    subs |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert subs <= set(LAYERS), f"give these a layer in tests/test_layering.py: {sorted(subs - set(LAYERS))}"


def test_imports_only_go_downward():
    bad, graph = violations(package_sources())
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)
    assert not cycles(graph), f"cycles between subpackages: {cycles(graph)}"


@pytest.mark.parametrize("module,source,is_package,expected", [
    ("modalmill.labelers.weights", "from ..io import storage\n", False, []),
    ("modalmill.labelers.weights", "def f():\n    from ..pipeline import storage\n", False,
     ["labelers -> pipeline"]),
    ("modalmill.labelers", "from ..tokenize import labelers\n", True, ["labelers -> tokenize"]),
    ("modalmill.io.storage", "import modalmill.jobs.runner\n", False, ["io -> jobs"]),
    ("modalmill.dataset.loader", "from ..pipeline.shard import x\n", False, ["dataset -> pipeline"]),
    ("modalmill.jobs.runner", "from .. import __version__\nfrom ..io import manifest\n", False, []),
])
def test_the_check_catches_upward_imports(module, source, is_package, expected):
    bad, _ = violations({module: (source, is_package)})
    assert [b.split("(")[1].split(":")[0] for b in bad] == expected


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert not cycles({"a": {"b"}, "b": {"c"}})
