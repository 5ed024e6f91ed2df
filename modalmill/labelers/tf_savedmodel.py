"""Read what a TensorFlow / Keras SavedModel stores, without TensorFlow: the variables (a *tensor bundle*:
``variables/variables.index``, a LevelDB-style table of ``BundleEntryProto`` records, and ``variables.data-*``,
the raw tensors) and the graph's constants and nodes (``saved_model.pb``), decoded from the protobuf wire format.

Only what LAION's NSFW detector needs (:mod:`.nsfw`): uncompressed tables (TensorFlow writes bundles without
compression), one data shard, dtypes float32/float64/int32/int64/string, and the ``Const`` nodes of the main
graph plus the nodes of the library's functions. Field numbers are TensorFlow's ``tensor_bundle.proto``,
``saved_model.proto``, ``meta_graph.proto``, ``graph.proto``, ``node_def.proto``, ``function.proto`` and
``tensor.proto``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GraphNode", "graph_nodes", "read_bundle"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 10: np.bool_}
_STRING = 7


def _varint(b: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return result, i


def fields(b: bytes) -> dict[int, list]:
    """The protobuf message ``b`` as ``{field number: [values]}`` (varints as ints, the rest as bytes)."""
    i, out = 0, {}
    while i < len(b):
        tag, i = _varint(b, i)
        wire = tag & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
        out.setdefault(tag >> 3, []).append(v)
    return out


def _block(b: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block (prefix-compressed keys, restart array at the end)."""
    n_restarts = struct.unpack("<I", b[-4:])[0]
    end, i, key, out = len(b) - 4 - 4 * n_restarts, 0, b"", []
    while i < end:
        shared, i = _varint(b, i)
        unshared, i = _varint(b, i)
        size, i = _varint(b, i)
        key = key[:shared] + b[i:i + unshared]
        i += unshared
        out.append((key, b[i:i + size]))
        i += size
    return out


def _table(data: bytes) -> dict[str, bytes]:
    footer = data[-48:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise ValueError("not a TensorFlow tensor-bundle index (bad table magic)")
    i = 0
    for _ in range(2):  # the metaindex handle, then the index handle
        offset, i = _varint(footer, i)
        size, i = _varint(footer, i)
    out = {}
    for _, handle in _block(data[offset:offset + size]):
        off, j = _varint(handle, 0)
        n, _ = _varint(handle, j)
        if data[off + n] != 0:
            raise ValueError("compressed tensor-bundle blocks are not supported")
        out.update((k.decode(), v) for k, v in _block(data[off:off + n]))
    return out


def _shape(proto: bytes) -> tuple[int, ...]:
    return tuple(fields(d).get(1, [0])[0] for d in fields(proto).get(2, []))


def _strings(raw: bytes, n: int) -> list[bytes]:
    """A bundle's string tensor: ``n`` varint lengths, a 4-byte checksum, then the bytes."""
    lengths, i = [], 0
    for _ in range(n):
        length, i = _varint(raw, i)
        lengths.append(length)
    i += 4
    out = []
    for length in lengths:
        out.append(raw[i:i + length])
        i += length
    return out


def read_bundle(index: bytes, data: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """Every tensor of a one-shard tensor bundle by its checkpoint key (string tensors as lists of bytes)."""
    out: dict[str, np.ndarray | list[bytes]] = {}
    for key, value in _table(index).items():
        if not key:  # the header entry
            continue
        entry = fields(value)
        dtype, shape = entry.get(1, [0])[0], _shape(entry[2][0]) if 2 in entry else ()
        offset, size = entry.get(4, [0])[0], entry.get(5, [0])[0]
        raw = data[offset:offset + size]
        if dtype == _STRING:
            out[key] = _strings(raw, int(np.prod(shape)) if shape else 1)
        elif dtype in _DTYPES:
            out[key] = np.frombuffer(raw, _DTYPES[dtype]).reshape(shape).copy()
    return out


@dataclass
class GraphNode:
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, bytes] = field(default_factory=dict)

    def tensor(self) -> np.ndarray | list[bytes]:
        """A ``Const`` node's value (``attr value``: an AttrValue holding a TensorProto)."""
        t = fields(fields(self.attrs["value"])[8][0])
        dtype, shape = t[1][0], _shape(t[2][0]) if 2 in t else ()
        if dtype == _STRING:
            return list(t.get(8, []))
        content = t.get(4, [b""])[0]
        if content:
            return np.frombuffer(content, _DTYPES[dtype]).reshape(shape).copy()
        return np.zeros(shape, _DTYPES[dtype])  # an empty tensor or a zero scalar


def _node(b: bytes) -> GraphNode:
    f = fields(b)
    attrs = {}
    for entry in f.get(5, []):
        kv = fields(entry)
        attrs[kv[1][0].decode()] = kv.get(2, [b""])[0]
    return GraphNode(f[1][0].decode(), f[2][0].decode(), [x.decode() for x in f.get(3, [])], attrs)


def graph_nodes(saved_model: bytes) -> tuple[list[GraphNode], dict[str, tuple[list[str], list[GraphNode]]]]:
    """(the first meta graph's nodes, ``{function name: (its argument names, its nodes)}`` of its library)."""
    meta = fields(fields(saved_model)[2][0])
    graph = fields(meta[2][0])
    nodes = [_node(b) for b in graph.get(1, [])]
    functions = {}
    for fb in fields(graph[2][0]).get(1, []) if 2 in graph else []:
        f = fields(fb)
        sig = fields(f[1][0])
        args = [fields(a)[1][0].decode() for a in sig.get(2, [])]
        functions[sig[1][0].decode()] = (args, [_node(b) for b in f.get(3, [])])
    return nodes, functions


def function_name(node: GraphNode) -> str:
    """The function a ``(Stateful)PartitionedCall`` node calls (its ``f`` attr: an AttrValue.func NameAttrList)."""
    return fields(fields(node.attrs["f"])[10][0])[1][0].decode()
