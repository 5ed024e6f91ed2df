"""No function or method in modalmill/ is over 80 lines (``end_lineno - lineno + 1`` of its ``def``, decorators
excluded): a longer one is split into named steps, or listed below with the reason it is not."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "modalmill"
MAX_LINES = 80

# (path relative to modalmill/, qualified name): why it may be longer. Keep this list short.
EXCEPTIONS: dict[tuple[str, str], str] = {
}


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines} of every function and method in ``source`` (nested ones as ``outer.inner``)."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_the_measure_counts_the_def_to_its_last_line_without_decorators():
    src = ("@dec\n@dec2\ndef f():\n    x = 1\n\n    return x\n\n\n"
           "class C:\n    def m(self):\n        def g():\n            pass\n")
    assert function_lengths(src) == {"f": 4, "C.m": 3, "C.m.g": 2}


def test_no_function_is_over_80_lines():
    too_long, used = [], set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for name, n in function_lengths(path.read_text()).items():
            if n <= MAX_LINES:
                continue
            if (rel, name) in EXCEPTIONS:
                used.add((rel, name))
                continue
            too_long.append(f"modalmill/{rel}: {name} is {n} lines")
    assert not too_long, "split these into named steps (or list one in EXCEPTIONS, with the reason):\n" + "\n".join(
        too_long)
    stale = sorted(set(EXCEPTIONS) - used)
    assert not stale, f"these exceptions are no longer over {MAX_LINES} lines (or gone): remove them: {stale}"
