"""Semantic deduplication (SemDeDup: Abbas et al., "SemDeDup: Data-efficient learning at web-scale through
semantic deduplication", 2023): cluster the L2-normalised embeddings with spherical k-means, then, inside each
cluster only, call every pair with cosine similarity >= ``threshold`` a duplicate.

Scaling on one machine (numbers in benchmarks/RESULTS.md, ``bench_dedup``):

- The embeddings are held once, L2-normalised, as float16: ``n * d * 2`` bytes (1.5 GiB for 1M x 768).
- k-means is two-level so that its cost per sample does not grow with ``k``: ``sqrt(n / cluster_size)`` coarse
  clusters, then each coarse cluster larger than ``2 * cluster_size`` is split into ``ceil(size /
  cluster_size)`` fine ones. Every k-means is trained on at most ``train_per_centroid`` samples per centroid
  (as faiss does), with Lloyd iterations on float32 torch matmuls, and then assigns its points in blocks.
- The pairwise step works leaf by leaf in row blocks (``block`` rows x leaf size), so its memory is bounded by
  the largest leaf, and its time is ``n * mean leaf size * d``: linear in ``n`` for a fixed ``cluster_size``.

Pairs across cluster boundaries are not compared: that is SemDeDup's approximation, and why near-duplicates of
images (crops, re-encodings) are the perceptual hash's job. torch (a dependency already) does the linear
algebra; faiss would do the same k-means, and is not needed for this size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["SemanticConfig", "normalise", "semantic_pairs", "spherical_kmeans"]


@dataclass(frozen=True)
class SemanticConfig:
    threshold: float = 0.95  # cosine similarity at or above which two samples are duplicates
    cluster_size: int = 1000  # the mean number of samples per leaf cluster
    iters: int = 15  # Lloyd iterations per k-means
    train_per_centroid: int = 128  # k-means trains on at most this many samples per centroid
    seed: int = 0
    block: int = 2048  # rows per matrix product

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        for name in ("cluster_size", "iters", "train_per_centroid", "block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")


def normalise(emb: np.ndarray, block: int = 65536) -> np.ndarray:
    """L2-normalised float16 copy of ``[n, d]`` embeddings (rows of zeros stay zero), computed in blocks."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got shape {emb.shape}")
    out = np.empty(emb.shape, np.float16)
    for s in range(0, len(emb), block):
        x = emb[s:s + block].astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"embeddings rows {s}..{s + len(x) - 1} hold NaN or infinite values")
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + block] = x / np.maximum(norm, 1e-12)
    return out


def _assign(x: np.ndarray, centroids, block: int) -> np.ndarray:
    import torch

    labels = np.empty(len(x), np.int64)
    for s in range(0, len(x), block):
        xb = torch.from_numpy(x[s:s + block].astype(np.float32))
        labels[s:s + block] = (xb @ centroids.T).argmax(dim=1).numpy()
    return labels


def spherical_kmeans(x: np.ndarray, k: int, cfg: SemanticConfig, rng: np.random.Generator) -> np.ndarray:
    """Cluster label per row of normalised ``x`` (k-means on the unit sphere, cosine assignment)."""
    import torch

    n = len(x)
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, np.int64)
    train_idx = np.sort(rng.choice(n, size=min(n, k * cfg.train_per_centroid), replace=False))
    train = torch.from_numpy(x[train_idx].astype(np.float32))
    centroids = train[torch.from_numpy(rng.choice(len(train), size=k, replace=False))].clone()
    for _ in range(cfg.iters):
        labels = (train @ centroids.T).argmax(dim=1)
        onehot = torch.nn.functional.one_hot(labels, k).to(train.dtype)  # a matmul: far faster than index_add_
        sums = onehot.T @ train
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters with random training points
            sums[empty] = train[torch.from_numpy(rng.choice(len(train), size=int(empty.sum()), replace=False))]
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _assign(x, centroids, cfg.block)


def _leaves(x: np.ndarray, cfg: SemanticConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each leaf cluster (two-level k-means)."""
    n = len(x)
    k1 = max(1, round(math.sqrt(n / cfg.cluster_size)))
    coarse = spherical_kmeans(x, k1, cfg, rng)
    order = np.argsort(coarse, kind="stable")
    bounds = np.flatnonzero(np.diff(coarse[order])) + 1
    leaves = []
    for members in np.split(order, bounds):
        if len(members) <= 2 * cfg.cluster_size:
            leaves.append(members)
            continue
        fine = spherical_kmeans(x[members], math.ceil(len(members) / cfg.cluster_size), cfg, rng)
        o = np.argsort(fine, kind="stable")
        leaves.extend(np.split(members[o], np.flatnonzero(np.diff(fine[o])) + 1))
    return leaves


def _leaf_pairs(x: np.ndarray, members: np.ndarray, cfg: SemanticConfig) -> tuple[np.ndarray, np.ndarray]:
    import torch

    members = np.sort(members)
    xl = torch.from_numpy(x[members].astype(np.float32))
    pairs, sims = [], []
    for s in range(0, len(members), cfg.block):
        sim = xl[s:s + cfg.block] @ xl.T
        rows, cols = torch.nonzero(sim >= cfg.threshold, as_tuple=True)
        keep = cols > rows + s  # each pair once, no self pairs
        rows, cols = rows[keep], cols[keep]
        if len(rows):
            pairs.append(np.stack([members[rows.numpy() + s], members[cols.numpy()]], axis=1))
            sims.append(sim[rows, cols].numpy())
    if not pairs:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    return np.concatenate(pairs), np.concatenate(sims)


def semantic_pairs(emb: np.ndarray, cfg: SemanticConfig = SemanticConfig(),
                   progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pairs ``[P, 2]`` with i < j, their cosine similarities, the leaf cluster of each sample).

    ``emb`` is ``[n, d]`` (any float dtype; normalised here unless already float16 unit rows).
    ``progress(n)`` is called with the number of samples of each leaf done."""
    x = emb if emb.dtype == np.float16 and _is_unit(emb) else normalise(emb)
    rng = np.random.default_rng(cfg.seed)
    leaves = _leaves(x, cfg, rng) if len(x) else []
    leaf_of = np.empty(len(x), np.int64)
    all_pairs, all_sims = [], []
    for i, members in enumerate(leaves):
        leaf_of[members] = i
        p, s = _leaf_pairs(x, members, cfg)
        all_pairs.append(p)
        all_sims.append(s)
        if progress:
            progress(len(members))
    if not all_pairs:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32), leaf_of
    return np.concatenate(all_pairs), np.concatenate(all_sims), leaf_of


def _is_unit(x: np.ndarray, sample: int = 1000) -> bool:
    rows = x[:sample].astype(np.float32)
    return bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-2))
