"""Finding duplicate pairs without comparing all pairs, and turning pairs into groups with a keep decision.

- :func:`exact_groups`: samples with equal digests (a sort).
- :func:`near_pairs`: every pair of 64-bit hashes within Hamming distance ``threshold``, by multi-index hashing
  (Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index hashing", CVPR 2012): the hash is cut
  into ``m`` chunks of ``64 / m`` bits; two hashes within distance ``t`` agree to within ``t // m`` bits in at
  least one chunk (pigeonhole). For each chunk the values are sorted once, and every value XOR every mask of at
  most ``t // m`` bits is looked up with a binary search (vectorised over all samples): candidate pairs, which are
  then verified with the full Hamming distance. Exact (no pair within ``t`` is missed); cost grows with
  ``n * m * sum_{r <= t//m} C(64/m, r)`` lookups plus the candidates, never with ``n^2``.
- :func:`groups_from_pairs`: connected components (union-find) of the pair graph.
- :func:`keep_decisions`: the keep rule, applied to each group (see :data:`KEEP_RULE`).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from .hashes import hamming

__all__ = ["KEEP_RULE", "exact_groups", "groups_from_pairs", "keep_decisions", "near_pairs"]

KEEP_RULE = ("in each group, keep the sample with the largest stored image (width x height); ties go to the "
             "first in the output's order (shard number, then position in the shard)")


def exact_groups(digests: list[str]) -> np.ndarray:
    """Group id per sample (-1 for samples whose digest no other sample shares); ids are 0.. in first-seen order."""
    first: dict[str, int] = {}
    count: dict[str, int] = {}
    for d in digests:
        count[d] = count.get(d, 0) + 1
    out = np.full(len(digests), -1, dtype=np.int64)
    for i, d in enumerate(digests):
        if count[d] > 1:
            out[i] = first.setdefault(d, len(first))
    return out


def _masks(bits: int, radius: int) -> np.ndarray:
    out = [0]
    for r in range(1, radius + 1):
        for pos in combinations(range(bits), r):
            out.append(sum(1 << p for p in pos))
    return np.array(out, dtype=np.uint64)


def _chunk_candidates(index_vals: np.ndarray, query_vals: np.ndarray, masks: np.ndarray):
    """(query row, index row) pairs whose chunk values differ by one of ``masks``."""
    order = np.argsort(index_vals, kind="stable")
    srt = index_vals[order]
    qs, js = [], []
    for mask in masks:
        probe = query_vals ^ mask
        lo = np.searchsorted(srt, probe, "left")
        hi = np.searchsorted(srt, probe, "right")
        n = hi - lo
        if not n.any():
            continue
        q = np.repeat(np.arange(len(query_vals)), n)
        starts = np.repeat(lo - np.concatenate(([0], np.cumsum(n)[:-1])), n)
        js.append(order[starts + np.arange(len(q))])
        qs.append(q)
    if not qs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(qs), np.concatenate(js)


def near_pairs(hashes: np.ndarray, threshold: int, queries: list[np.ndarray] | None = None,
               n_chunks: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(pairs ``[P, 2]`` with i < j, their distances) of samples within Hamming ``threshold``.

    ``hashes`` is uint64 ``[n]``; ``queries`` are extra hash arrays of the same samples (the mirrored image's
    hash): a pair counts when any query hash of i is within ``threshold`` of the hash of j, and its distance
    is the smallest such. ``n_chunks`` in {1, 2, 4, 8}."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if n_chunks not in (1, 2, 4, 8):
        raise ValueError("n_chunks must be 1, 2, 4 or 8")
    if not 0 <= threshold < 64:
        raise ValueError(f"threshold must lie in [0, 63], got {threshold}")
    queries = [hashes] + [np.asarray(q, dtype=np.uint64) for q in (queries or [])]
    bits = 64 // n_chunks
    masks = _masks(bits, threshold // n_chunks)
    low = np.uint64((1 << bits) - 1)
    n = len(hashes)
    keys = []
    for c in range(n_chunks):
        shift = np.uint64(c * bits)
        index_vals = (hashes >> shift) & low
        for q in queries:
            qi, j = _chunk_candidates(index_vals, (q >> shift) & low, masks)
            keep = qi != j
            a, b = np.minimum(qi[keep], j[keep]), np.maximum(qi[keep], j[keep])
            keys.append(a.astype(np.int64) * n + b)
    if not keys:
        return np.empty((0, 2), np.int64), np.empty(0, np.int64)
    uniq = np.unique(np.concatenate(keys))
    i, j = uniq // max(n, 1), uniq % max(n, 1)
    dist = np.min([np.minimum(hamming(q[i], hashes[j]), hamming(q[j], hashes[i])) for q in queries], axis=0)
    ok = dist <= threshold
    return np.stack([i[ok], j[ok]], axis=1), dist[ok]


def groups_from_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id per sample from duplicate pairs (connected components); -1 for samples in no pair.
    Ids are 0.. numbered by each group's smallest member."""
    parent = np.arange(n, dtype=np.int64)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    sizes = np.bincount(roots, minlength=n)
    out = np.full(n, -1, dtype=np.int64)
    ids: dict[int, int] = {}
    for i in range(n):
        if sizes[roots[i]] > 1:
            out[i] = ids.setdefault(int(roots[i]), len(ids))
    return out


def keep_decisions(groups: np.ndarray, area: np.ndarray | None = None) -> np.ndarray:
    """Boolean keep per sample under :data:`KEEP_RULE`; samples are in the output's order, so the index breaks
    ties. Samples in no group (-1) are kept."""
    groups = np.asarray(groups)
    n = len(groups)
    area = np.zeros(n, np.int64) if area is None else np.asarray(area, dtype=np.int64)
    keep = groups < 0
    in_group = np.flatnonzero(groups >= 0)
    if len(in_group):
        # sort by (group, -area, index): the first row of each group is its kept sample
        order = in_group[np.lexsort((in_group, -area[in_group], groups[in_group]))]
        first = np.ones(len(order), bool)
        first[1:] = groups[order[1:]] != groups[order[:-1]]
        keep[order[first]] = True
    return keep
