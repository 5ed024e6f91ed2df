"""Semantic deduplication (SemDeDup: Abbas et al., "SemDeDup: Data-efficient learning at web-scale through
semantic deduplication", 2023): cluster the L2-normalised embeddings with spherical k-means, then, inside each
cluster only, call every pair with cosine similarity >= ``threshold`` a duplicate.

It runs as a map and a reduce over *blocks* of embeddings (one block per output shard in ``modalmill dedup``),
in process (:func:`semantic_pairs`) or as Ray tasks (:func:`semantic_pairs_ray`), with the same result:

1. **coarse centroids** (the driver): ``k1 = sqrt(n / cluster_size)`` centroids trained by spherical k-means on
   a uniform sample of at most ``train_per_centroid`` rows per centroid (as faiss does), fetched from the blocks;
2. **assignment** (one task per block, :func:`split_block`): each row to its nearest coarse centroid; the block
   comes back cut into ``k1`` parts (a shuffle: Ray keeps every part in its object store);
3. **within each coarse cluster** (one task per cluster, :func:`cluster_pairs`): the cluster's parts, in global
   order, are split by a second k-means into ``ceil(size / cluster_size)`` leaves (seeded by ``(seed, cluster)``,
   so the result does not depend on how the rows were blocked or scheduled); rows are sorted by leaf and every
   leaf's pairs found with one matrix product of its contiguous rows.

Cost: the k-means steps train on samples, so their cost per row is ``(k1 + k2) * d`` for the assignment; the
pairwise step is ``n * cluster_size * d``: linear in ``n`` for a fixed ``cluster_size``. Memory: the driver holds
the coarse training sample (``k1 * 128`` rows) and the pairs; a block task holds one block; a cluster task one
coarse cluster (``sqrt(n * cluster_size)`` rows: 31,623 x 768 x 2 bytes = 46 MiB at 1M) plus one leaf's float32
rows and similarities. The embeddings are held as L2-normalised float16 (``n * d * 2`` bytes: 1.5 GiB for
1M x 768) in the blocks and once more in the shuffled parts (Ray's object store, spilled to disk when full).

Pairs across cluster boundaries are not compared: that is SemDeDup's approximation, and why near-duplicates of
images (crops, re-encodings) are the perceptual hash's job. torch (a dependency already) does the linear algebra:
the time is in the pairwise products, which faiss would not shorten (``benchmarks/bench_dedup.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SemanticConfig", "cluster_pairs", "n_coarse", "normalise", "semantic_pairs", "semantic_pairs_ray",
           "rows_task", "spherical_kmeans", "split_block", "take_rows", "train_centroids"]


@dataclass(frozen=True)
class SemanticConfig:
    threshold: float = 0.95  # cosine similarity at or above which two samples are duplicates
    cluster_size: int = 1000  # the mean number of samples per leaf cluster
    iters: int = 15  # Lloyd iterations per k-means
    train_per_centroid: int = 128  # k-means trains on at most this many samples per centroid
    seed: int = 0
    block: int = 4096  # rows per matrix product

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        for name in ("cluster_size", "iters", "train_per_centroid", "block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")


def _f32(x: np.ndarray):
    """A float32 torch tensor of ``x`` (torch converts float16 several times faster than numpy)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).float()


def normalise(emb: np.ndarray, block: int = 65536) -> np.ndarray:
    """L2-normalised float16 copy of ``[n, d]`` embeddings (rows of zeros stay zero), computed in blocks."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got shape {emb.shape}")
    out = np.empty(emb.shape, np.float16)
    for s in range(0, len(emb), block):
        x = _f32(emb[s:s + block])
        if not bool(x.isfinite().all()):
            raise ValueError(f"embeddings rows {s}..{s + len(x) - 1} hold NaN or infinite values")
        out[s:s + block] = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).half().numpy()
    return out


def n_coarse(n: int, cfg: SemanticConfig) -> int:
    """The number of coarse clusters for ``n`` rows: ``sqrt(n / cluster_size)``, at least 1."""
    return max(1, round(math.sqrt(n / cfg.cluster_size)))


def train_centroids(train: np.ndarray, k: int, cfg: SemanticConfig, rng: np.random.Generator) -> np.ndarray:
    """``[k, d]`` unit centroids of spherical k-means (Lloyd, cosine) on the normalised rows ``train``."""
    import torch

    t = _f32(train)
    k = max(1, min(k, len(t)))
    centroids = t[torch.from_numpy(np.sort(rng.choice(len(t), size=k, replace=False)))].clone()
    for _ in range(cfg.iters if k > 1 else 0):
        labels = (t @ centroids.T).argmax(dim=1)
        onehot = torch.nn.functional.one_hot(labels, k).to(t.dtype)  # a matmul: far faster than index_add_
        sums = onehot.T @ t
        empty = torch.bincount(labels, minlength=k) == 0
        if empty.any():  # re-seed empty clusters with random training points
            sums[empty] = t[torch.from_numpy(rng.choice(len(t), size=int(empty.sum()), replace=False))]
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return centroids.numpy()


def assign(x: np.ndarray, centroids: np.ndarray, block: int) -> np.ndarray:
    """The nearest centroid (highest cosine) of each row of ``x``, computed in row blocks."""
    c = _f32(centroids)
    labels = np.empty(len(x), np.int64)
    for s in range(0, len(x), block):
        labels[s:s + block] = (_f32(x[s:s + block]) @ c.T).argmax(dim=1).numpy()
    return labels


def spherical_kmeans(x: np.ndarray, k: int, cfg: SemanticConfig, rng: np.random.Generator) -> np.ndarray:
    """Cluster label per row of normalised ``x``: centroids trained on a sample, then every row assigned."""
    k = max(1, min(k, len(x)))
    if k == 1:
        return np.zeros(len(x), np.int64)
    idx = np.sort(rng.choice(len(x), size=min(len(x), k * cfg.train_per_centroid), replace=False))
    return assign(x, train_centroids(x[idx], k, cfg, rng), cfg.block)


def _by_label(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(stable order of the rows by label, the start of each label's run in it: ``k + 1`` bounds)."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(k + 1))


def split_block(x: np.ndarray, offset: int, centroids: np.ndarray, block: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The map step: one block's rows cut by nearest coarse centroid: ``k`` (global indices, rows), in order."""
    k = len(centroids)
    order, bounds = _by_label(assign(x, centroids, block), k)
    return [(offset + order[bounds[c]:bounds[c + 1]], x[order[bounds[c]:bounds[c + 1]]]) for c in range(k)]


def _leaf_pairs(xl: np.ndarray, cfg: SemanticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols with row < col, cosine) of one leaf's contiguous rows with cosine >= threshold."""
    import torch

    t = _f32(xl)
    rows_out, cols_out, sims_out = [], [], []
    for s in range(0, len(t), cfg.block):
        sim = t[s:s + cfg.block] @ t[s:].T  # only columns from s on: the pairs below were found already
        rows, cols = torch.nonzero(sim >= cfg.threshold, as_tuple=True)
        keep = cols > rows  # each pair once, no self pairs (column j of sim is row s + j)
        rows, cols = rows[keep], cols[keep]
        if len(rows):
            rows_out.append(rows.numpy() + s)
            cols_out.append(cols.numpy() + s)
            sims_out.append(sim[rows, cols].numpy())
    if not rows_out:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(sims_out)


def cluster_pairs(cfg: SemanticConfig, cluster: int, *parts: tuple[np.ndarray, np.ndarray]) -> dict:
    """The reduce step: one coarse cluster's parts (global indices, rows) -> its leaves and their pairs.

    Returns ``idx`` (the global index of each row), ``leaf`` (its leaf, 0-based within the cluster),
    ``n_leaves``, ``pairs`` ``[P, 2]`` of global indices with i < j and ``sims``."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return {"idx": np.empty(0, np.int64), "leaf": np.empty(0, np.int64), "n_leaves": 0,
                "pairs": np.empty((0, 2), np.int64), "sims": np.empty(0, np.float32)}
    idx, x = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")  # global order, however the rows were blocked
    idx, x = idx[order], x[order]
    k = math.ceil(len(x) / cfg.cluster_size) if len(x) > 2 * cfg.cluster_size else 1
    labels = spherical_kmeans(x, k, cfg, np.random.default_rng([cfg.seed, cluster]))
    order, bounds = _by_label(labels, k)
    x, idx, labels = x[order], idx[order], labels[order]  # leaf by leaf, contiguous
    pairs, sims = [], []
    for c in range(k):
        s, e = int(bounds[c]), int(bounds[c + 1])
        r, q, sim = _leaf_pairs(x[s:e], cfg)
        ij = np.stack([idx[s + r], idx[s + q]], axis=1)
        pairs.append(np.sort(ij, axis=1))
        sims.append(sim)
    return {"idx": idx, "leaf": labels, "n_leaves": int(k),
            "pairs": np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64),
            "sims": np.concatenate(sims) if sims else np.empty(0, np.float32)}


def _combine(n: int, results: list[dict]):
    """(pairs, sims, global leaf of each sample) from the clusters' results, in cluster order."""
    leaf_of = np.full(n, -1, np.int64)
    first = 0
    for r in results:
        leaf_of[r["idx"]] = r["leaf"] + first
        first += r["n_leaves"]
    pairs = [r["pairs"] for r in results if len(r["pairs"])]
    if not pairs:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32), leaf_of
    return np.concatenate(pairs), np.concatenate([r["sims"] for r in results if len(r["pairs"])]), leaf_of


def _sample_index(n: int, k: int, cfg: SemanticConfig, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(n, k * cfg.train_per_centroid), replace=False))


def take_rows(blocks: Sequence[tuple[int, object]], idx: np.ndarray, get: Callable | None = None,
              per_task: int = 64) -> np.ndarray:
    """Rows ``idx`` (sorted global indices) of the blocks ``(offset, array)``; with ``get`` (:func:`rows_task`)
    the arrays are object refs and the rows are cut out where they live, ``per_task`` blocks per task."""
    wanted = []
    for (offset, arr), end in zip(blocks, [b[0] for b in blocks[1:]] + [np.iinfo(np.int64).max]):
        local = idx[(idx >= offset) & (idx < end)] - offset
        if len(local):
            wanted.append((local, arr))
    chunks = [wanted[i:i + per_task] for i in range(0, len(wanted), per_task)]
    if get is not None:
        import ray

        out = ray.get([get.remote([w[0] for w in c], *[w[1] for w in c]) for c in chunks])
    else:
        out = [_rows_of([w[0] for w in c], *[w[1] for w in c]) for c in chunks]
    return np.concatenate(out) if out else np.empty((0, 1), np.float16)


def semantic_pairs(emb: np.ndarray, cfg: SemanticConfig = SemanticConfig(),
                   progress: Callable[[int], None] | None = None,
                   block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pairs ``[P, 2]`` with i < j, their cosine similarities, the leaf cluster of each sample), in process.

    ``emb`` is ``[n, d]`` (any float dtype; normalised here unless already float16 unit rows). ``progress(n)``
    is called with the number of samples of each coarse cluster done."""
    x = emb if emb.dtype == np.float16 and _is_unit(emb) else normalise(emb)
    n = len(x)
    if n == 0:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
    rng = np.random.default_rng(cfg.seed)
    k1 = n_coarse(n, cfg)
    centroids = train_centroids(x[_sample_index(n, k1, cfg, rng)], k1, cfg, rng)
    parts = [split_block(x[s:s + block_rows], s, centroids, cfg.block) for s in range(0, n, block_rows)]
    results = []
    for c in range(len(centroids)):
        results.append(cluster_pairs(cfg, c, *[p[c] for p in parts]))
        if progress:
            progress(len(results[-1]["idx"]))
    return _combine(n, results)


def _rows_of(locals_: list[np.ndarray], *arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([a[i] for i, a in zip(locals_, arrays)])


def rows_task():
    """The Ray task :func:`take_rows` cuts rows out of object-store blocks with."""
    import ray

    return ray.remote(num_cpus=1, max_retries=2)(_rows_of)


def _split_task(centroids: np.ndarray, block: int, offset: int, *arrays: np.ndarray):
    """:func:`split_block` of consecutive blocks (concatenated) as a task of ``len(centroids)`` returns (one
    return is the part itself, not a list)."""
    parts = split_block(arrays[0] if len(arrays) == 1 else np.concatenate(arrays), offset, centroids, block)
    return parts[0] if len(parts) == 1 else tuple(parts)


def _map_groups(blocks: Sequence[tuple[int, object]], n: int, rows: int) -> list[list[int]]:
    """Consecutive blocks grouped to at least ``rows`` rows each (the map tasks' inputs): small output shards
    would otherwise cut into parts below Ray's inline size, which travel through the driver."""
    groups, current, start = [], [], 0
    ends = [b[0] for b in blocks[1:]] + [n]
    for i, end in enumerate(ends):
        current.append(i)
        if end - start >= rows:
            groups.append(current)
            current, start = [], end
    if current:
        groups.append(current)
    return groups


def semantic_pairs_ray(blocks: Sequence[tuple[int, object]], n: int, cfg: SemanticConfig = SemanticConfig(),
                       progress: Callable[[int], None] | None = None,
                       map_rows: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`semantic_pairs` as Ray tasks over ``blocks``: ``(offset, ref)`` of normalised float16 ``[m, d]``
    arrays in Ray's object store, in order, covering rows ``0..n-1``. The driver trains the coarse centroids on
    a sample it fetches; one task per ``map_rows`` rows of consecutive blocks assigns and cuts them; one task per
    coarse cluster finds its pairs."""
    import ray

    if n == 0:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
    rng = np.random.default_rng(cfg.seed)
    k1 = n_coarse(n, cfg)
    centroids = train_centroids(take_rows(blocks, _sample_index(n, k1, cfg, rng), rows_task()), k1, cfg, rng)
    k1 = len(centroids)
    split = ray.remote(num_cpus=1, max_retries=2, num_returns=k1)(_split_task)
    cref = ray.put(centroids)
    parts = [split.remote(cref, cfg.block, blocks[g[0]][0], *[blocks[i][1] for i in g])
             for g in _map_groups(blocks, n, map_rows)]
    parts = [p if isinstance(p, list) else [p] for p in parts]  # num_returns=1 gives one ref
    reduce = ray.remote(num_cpus=1, max_retries=2)(cluster_pairs)
    refs = [reduce.remote(cfg, c, *[p[c] for p in parts]) for c in range(k1)]  # refs as arguments: resolved
    del parts  # the cluster tasks hold the parts now: each is freed when its task is done
    results = []
    for ref in refs:
        results.append(ray.get(ref))
        if progress:
            progress(len(results[-1]["idx"]))
    return _combine(n, results)


def _is_unit(x: np.ndarray, sample: int = 1000) -> bool:
    rows = x[:sample].astype(np.float32)
    return bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-2))
