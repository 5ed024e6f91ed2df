"""``modalmill dedup``: find duplicate samples of an output, one of three ways, and record the groups.

One Ray task per completed shard reads what the method needs (the stored ``rgb`` tar for ``exact`` and
``phash``, a global-embedding tar for ``semantic``) and returns small per-sample fingerprints; the driver
finds the groups (see :mod:`.index` and :mod:`.semantic`) and writes ``_modalmill/dedup/<name>.parquet``:
one row per sample that is in a group, with the group id, the keep decision (:data:`.index.KEEP_RULE`) and its
distance to the kept sample. The parquet's schema metadata holds the method, its settings, the rule and counts.

Methods and what each is meant to catch:

- ``exact``: the same decoded pixels (the 128-bit SHA-256 prefix of shape + pixels of the stored rgb).
  Catches copies, whatever the input container; nothing that changed a pixel.
- ``phash``: near duplicates: re-encodings (JPEG quality 30), resizes, small colour shifts (pHash), mirrored
  copies and centre crops to 90% (the mirror and centre-crop hashes are queried too); Hamming ``threshold``
  (default 10 of 64 bits) on multi-index hashing, never all pairs.
- ``semantic``: SemDeDup on the crop-0 vector (4M's centre crop) of a global embedding modality
  (``dinov2_global`` by default, or ``clip_global`` / ``imagebind_global``), cosine ``threshold``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from ... import __version__
from ...io import manifest, storage
from ...io.tars import decode_member, iter_tar_groups, scan_layout
from ...schemas.modalities import get_modality
from .hashes import hamming, phash_triple, pixel_digest
from .index import KEEP_RULE, exact_groups, groups_from_pairs, keep_decisions, near_pairs
from .semantic import SemanticConfig, normalise, rows_task, semantic_pairs_ray, take_rows

__all__ = ["METHODS", "DedupConfig", "dedup_url", "read_dedup", "run_dedup"]

METHODS = ("exact", "phash", "semantic")


@dataclass(frozen=True)
class DedupConfig:
    method: str = "phash"
    name: str = ""  # the result's name (default: the method)
    threshold: float | None = None  # phash: max Hamming bits (10); semantic: min cosine (0.95)
    modality: str = "dinov2_global"  # semantic: the embedding modality
    semantic: SemanticConfig = field(default_factory=SemanticConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.name and (not self.name.replace("-", "").replace("_", "").isalnum()):
            raise ValueError(f"--name must be letters, digits, '-' or '_', got {self.name!r}")

    @property
    def result_name(self) -> str:
        return self.name or self.method


def dedup_url(root: str, name: str) -> str:
    return manifest.meta_url(root, "dedup", f"{name}.parquet")


# ---------------------------------------------------------------------- per shard (a Ray task)


def shard_fingerprints(root: str, shard: str, keys: list[str], url: str, method: str) -> dict:
    """Fingerprints of one shard's samples, in marker order: digests, pHash triples or crop-0 embeddings."""
    want = {k: i for i, k in enumerate(keys)}
    area = np.zeros(len(keys), np.int64)
    feats: list = [None] * len(keys)
    folder = url.rstrip("/").split("/")[-2]
    spec = get_modality(folder) if method == "semantic" else get_modality("rgb")
    for key, members in iter_tar_groups(url):
        if key not in want:
            continue
        i = want[key]
        ext, data = next(iter(members.items()))
        value = decode_member(spec, ext, data)
        if method == "exact":
            feats[i], area[i] = pixel_digest(value), value.shape[0] * value.shape[1]
        elif method == "phash":
            feats[i], area[i] = phash_triple(value), value.shape[0] * value.shape[1]
        else:
            feats[i] = np.asarray(value, dtype=np.float16)[0]
    missing = [k for k, i in want.items() if feats[i] is None]
    if missing:
        raise OSError(f"{url}: {len(missing)} sample(s) of the marker are not in the tar (first: {missing[0]!r}); "
                      "run `modalmill check`")
    if method == "semantic":
        rows = {r.key: r for r in manifest.read_rows(root, shard)}
        area = np.array([(rows[k].width or 0) * (rows[k].height or 0) if k in rows else 0 for k in keys], np.int64)
        return {"area": area, "emb": normalise(np.stack(feats))}
    if method == "phash":
        return {"area": area, "hashes": np.array(feats, dtype=np.uint64).reshape(-1, 3)}
    return {"area": area, "digests": feats}


def semantic_fingerprints(root: str, shard: str, keys: list[str], url: str) -> tuple[dict, np.ndarray]:
    """A shard's semantic fingerprints as two task returns: (the areas, the normalised float16 embeddings), so
    the embeddings stay in Ray's object store for the k-means tasks (:func:`.semantic.semantic_pairs_ray`)."""
    out = shard_fingerprints(root, shard, keys, url, "semantic")
    return {"area": out["area"]}, out["emb"]


def _gather(root: str, cfg: DedupConfig, progress: bool) -> tuple[list[tuple[str, str]], list[dict]]:
    """((shard, key) per sample in output order, per-shard fingerprints) computed by Ray tasks; for ``semantic``
    each shard's result holds ``emb_ref``, its embeddings' object ref, instead of the embeddings."""
    import ray

    from tqdm import tqdm

    markers = manifest.list_markers(root)
    if not markers:
        raise FileNotFoundError(f"{root}: no completed shards (no {manifest.META_DIR}/shards/ markers)")
    folder = cfg.modality if cfg.method == "semantic" else "rgb"
    layout = scan_layout(root)
    from ...io.cluster import local_s3_env

    semantic = cfg.method == "semantic"
    env = local_s3_env(root)  # workers started before this process's S3 settings were made get them
    task = (ray.remote(num_cpus=1, max_retries=2, num_returns=2)(semantic_fingerprints) if semantic else
            ray.remote(num_cpus=1, max_retries=2)(shard_fingerprints))
    task = task.options(**({"runtime_env": {"env_vars": env}} if env else {}))
    refs, order = [], []
    for shard in sorted(markers):
        url = layout.folders.get(folder, {}).get(f"{shard}.tar")
        if url is None:
            raise FileNotFoundError(f"{root}: shard {shard} has no {folder} tar (add it with `modalmill run --only "
                                    f"{folder}`)")
        keys = list(markers[shard]["keys"])
        order.extend((shard, k) for k in keys)
        args = (root, shard, keys, url) if semantic else (root, shard, keys, url, cfg.method)
        refs.append(task.remote(*args))
    results = []
    with tqdm(total=len(refs), desc=f"dedup {cfg.method}: shards", unit="shard", disable=not progress) as bar:
        for ref in refs:  # in shard order (results are small)
            results.append({**ray.get(ref[0]), "emb_ref": ref[1]} if semantic else ray.get(ref))
            bar.update(1)
    return order, results


# ---------------------------------------------------------------------- the groups


def _find(cfg: DedupConfig, results: list[dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(group per sample, distance of each sample to its group's kept sample placeholder, settings)."""
    if cfg.method == "exact":
        digests = [d for r in results for d in r["digests"]]
        return exact_groups(digests), np.zeros(len(digests)), {}
    if cfg.method == "phash":
        h = np.concatenate([r["hashes"] for r in results]) if results else np.empty((0, 3), np.uint64)
        t = int(10 if cfg.threshold is None else cfg.threshold)
        pairs, _ = near_pairs(h[:, 0], t, queries=[h[:, 1], h[:, 2]])
        return groups_from_pairs(len(h), pairs), h, {"threshold_bits": t, "queries": "mirror, centre 90% crop"}
    blocks, n = [], 0
    for r in results:
        blocks.append((n, r["emb_ref"]))
        n += len(r["area"])
    sem = cfg.semantic if cfg.threshold is None else SemanticConfig(**{**cfg.semantic.__dict__,
                                                                       "threshold": float(cfg.threshold)})
    pairs, _, leaf = semantic_pairs_ray(blocks, n, sem)
    return groups_from_pairs(n, pairs), blocks, {"threshold_cosine": sem.threshold, "modality": cfg.modality,
                                                 "cluster_size": sem.cluster_size, "seed": sem.seed,
                                                 "n_leaf_clusters": int(leaf.max() + 1) if len(leaf) else 0,
                                                 "kmeans": "two-level spherical k-means as Ray tasks"}


def _distances(method: str, feats, groups: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each grouped sample's distance to its group's kept sample: Hamming bits (the smallest over the
    queries), 1 - cosine, or 0 (exact)."""
    out = np.zeros(len(groups), np.float64)
    if method == "exact" or not (groups >= 0).any():
        return out
    kept_of = {int(g): i for i, g in enumerate(groups) if g >= 0 and keep[i]}
    idx = np.flatnonzero(groups >= 0)
    ref = np.array([kept_of[int(groups[i])] for i in idx])
    if method == "phash":
        h = feats
        d = np.min([hamming(h[idx, q], h[ref, 0]) for q in range(3)] +
                   [hamming(h[ref, q], h[idx, 0]) for q in range(3)], axis=0)
        out[idx] = d
    else:  # feats: the embedding blocks in Ray's object store; fetch the rows of the grouped samples only
        need = np.unique(np.concatenate([idx, ref]))
        rows = take_rows(feats, need, rows_task()).astype(np.float32)
        pos = {int(i): j for j, i in enumerate(need)}
        a, b = rows[[pos[int(i)] for i in idx]], rows[[pos[int(i)] for i in ref]]
        out[idx] = 1.0 - np.einsum("ij,ij->i", a, b)
    return out


def run_dedup(root: str, cfg: DedupConfig, progress: bool = True, address: str | None = None) -> dict:
    """Run one dedup method over ``root`` and write its result; returns a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ...io.cluster import init_ray

    started = time.time()
    init_ray(address, quiet_embedded=True)
    order, results = _gather(root, cfg, progress)
    groups, feats, settings = _find(cfg, results)
    area = np.concatenate([r["area"] for r in results]) if results else np.zeros(0, np.int64)
    keep = keep_decisions(groups, area)
    dist = _distances(cfg.method, feats, groups, keep)
    idx = np.flatnonzero(groups >= 0)
    positions = _positions(order)
    table = pa.table({
        "group": pa.array(groups[idx], pa.int64()),
        "shard": [order[i][0] for i in idx],
        "position": pa.array([positions[i] for i in idx], pa.int32()),
        "key": [order[i][1] for i in idx],
        "keep": pa.array(keep[idx], pa.bool_()),
        "area": pa.array(area[idx], pa.int64()),
        "distance": pa.array(dist[idx], pa.float64()),
    })
    summary = {"name": cfg.result_name, "method": cfg.method, "settings": settings, "keep_rule": KEEP_RULE,
               "n_samples": len(order), "n_groups": int(groups.max() + 1) if len(idx) else 0,
               "n_in_groups": int(len(idx)), "n_dropped": int(len(idx) - keep[idx].sum()),
               "modalmill_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": round(time.time() - started, 3)}
    table = table.replace_schema_metadata({b"modalmill.dedup": json.dumps(summary, sort_keys=True).encode()})
    url = dedup_url(root, cfg.result_name)
    with storage.atomic_write(url) as f:
        pq.write_table(table, f)
    return {**summary, "url": url}


def _positions(order: list[tuple[str, str]]) -> list[int]:
    out, last, pos = [], None, 0
    for shard, _ in order:
        pos = pos + 1 if shard == last else 0
        last = shard
        out.append(pos)
    return out


def read_dedup(root: str, name: str):
    """(the result table, its summary) of ``modalmill dedup --name NAME``; FileNotFoundError naming the command."""
    import io

    import pyarrow.parquet as pq

    url = dedup_url(root, name)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no dedup result {name!r} ({url}); run `modalmill dedup {root} "
                                f"--name {name} --method ...` first") from None
    table = pq.read_table(io.BytesIO(data))
    meta = json.loads((table.schema.metadata or {}).get(b"modalmill.dedup", b"{}"))
    return table, meta
