"""``--where`` expressions: a safe parser and evaluator for filters on a sample's scalar fields.

``aesthetic_score >= 5 and watermark_score < 0.5`` is parsed with :mod:`ast` and every node is checked against
a short whitelist; nothing is ever passed to ``eval``. The grammar:

- names: a sample's scalar fields (the ``metadata`` fields, ``nsfw_score``, ``clip_score``; see
  docs/curation.md). ``key`` is the sample key (a string).
- literals: numbers, strings, ``True``/``False``, and tuples/lists of those (for ``in``).
- comparisons ``< <= > >= == !=`` (chained as in Python: ``4 <= aesthetic_score < 8``), ``in`` / ``not in``.
- ``and``, ``or``, ``not``, parentheses; unary minus on numbers.

Anything else (calls, attributes, subscripts, arithmetic, lambdas, comprehensions) is a :class:`WhereError`
naming the construct. A comparison that reads a field the sample does not have is false (SQL's NULL rule,
so ``not (x < 1)`` is true for a sample without ``x``); :meth:`Where.missing` tells which fields are missing.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Where", "WhereError", "compile_where"]

_CMP = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_MAX_LEN = 2000


class WhereError(ValueError):
    """An expression outside the ``--where`` grammar."""


class _Missing(Exception):
    pass


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WhereError("unary minus applies to numbers only")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e) for e in node.elts)
    raise WhereError(f"not allowed in --where: {type(node).__name__} ({ast.unparse(node)!r})")


def _check(node: ast.AST, names: set[str]) -> None:
    """Raise WhereError for any node outside the grammar; collect the field names."""
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, names)
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _CMP for op in node.ops):
            raise WhereError(f"not allowed in --where: the comparison in {ast.unparse(node)!r}")
        for operand in (node.left, *node.comparators):
            if isinstance(operand, ast.Name):
                names.add(operand.id)
            else:
                _literal(operand)
    elif isinstance(node, ast.Name):  # a bare field: true when present and truthy
        names.add(node.id)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        pass
    else:
        raise WhereError(f"not allowed in --where: {type(node).__name__} ({ast.unparse(node)!r})")


@dataclass(frozen=True)
class Where:
    """A checked expression; call it on a ``{field: value}`` mapping."""

    text: str
    tree: ast.Expression = field(repr=False, compare=False)
    fields: frozenset[str] = frozenset()

    def __call__(self, record: Mapping[str, Any]) -> bool:
        return bool(self._eval(self.tree.body, record))

    def missing(self, record: Mapping[str, Any]) -> list[str]:
        return sorted(f for f in self.fields if f not in record)

    def _value(self, node: ast.AST, record: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Name):
            if node.id not in record or record[node.id] is None:
                raise _Missing(node.id)
            return record[node.id]
        return _literal(node)

    def _eval(self, node: ast.AST, record: Mapping[str, Any]) -> bool:
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                return all(self._eval(v, record) for v in node.values)
            return any(self._eval(v, record) for v in node.values)
        if isinstance(node, ast.UnaryOp):
            return not self._eval(node.operand, record)
        if isinstance(node, ast.Constant):
            return bool(node.value)
        try:
            if isinstance(node, ast.Name):
                return bool(self._value(node, record))
            left = self._value(node.left, record)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._value(right_node, record)
                try:
                    if not _CMP[type(op)](left, right):
                        return False
                except TypeError:  # e.g. a string field compared with a number: false, never an exception
                    return False
                left = right
            return True
        except _Missing:
            return False


def compile_where(text: str) -> Where:
    """Parse and check ``text``; WhereError for anything outside the grammar (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise WhereError("--where needs an expression, e.g. \"aesthetic_score >= 5 and watermark_score < 0.5\"")
    if len(text) > _MAX_LEN:
        raise WhereError(f"--where expression longer than {_MAX_LEN} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise WhereError(f"--where {text!r}: syntax error at column {e.offset}: {e.msg}") from None
    names: set[str] = set()
    _check(tree.body, names)
    return Where(text=text.strip(), tree=tree, fields=frozenset(names))


# ---------------------------------------------------------------------- where a field's value comes from


def needed_modalities(where: Where, available: set[str] | None = None) -> list[str]:
    """The modality folders ``where`` reads. A 4M-21 metadata name (``aesthetic_score``, ``watermark_score``, ...)
    is read from ``metadata`` (what 4M sees: the input's score where the corpus carried one), or from its scalar
    modality when ``available`` says the output has no ``metadata``; another registered modality's name
    (``clip_score``) is that modality's scalar value; any other name (but ``key``) is a ``metadata`` field."""
    from ..schemas.modalities import METADATA_RANGES, MODALITIES

    has_metadata = available is None or "metadata" in available
    out = []
    for f in sorted(where.fields):
        if f == "key":
            continue
        if f in METADATA_RANGES and has_metadata:
            m = "metadata"
        elif f in MODALITIES and f != "metadata":
            m = f
        else:
            m = "metadata"
        if m not in out:
            out.append(m)
    if available is not None:
        missing = [m for m in out if m not in available]
        if missing:
            raise WhereError(f"--where {where.text!r} reads {', '.join(missing)}, which the output does not have "
                             "(fields: metadata's, or a scalar modality's name)")
    return out


def record_of(key: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{field: value}`` a where expression sees, from a sample's decoded modalities: the ``metadata``
    dict's fields, each other modality as a number (a scalar or one-element array), and ``key``."""
    import numpy as np

    rec: dict[str, Any] = {}
    meta = values.get("metadata")
    if isinstance(meta, Mapping):
        rec.update(meta)
    for m, v in values.items():
        if m == "metadata":
            continue
        arr = np.asarray(v)
        if arr.size == 1 and arr.dtype.kind in "biuf":
            rec[m] = arr.reshape(()).item()
        elif isinstance(v, Mapping) and len(v) == 1:
            (only,) = v.values()
            rec[m] = only
    rec["key"] = key
    return rec
