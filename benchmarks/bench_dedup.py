"""Benchmark 7: semantic deduplication (SemDeDup, modalmill.jobs.dedup.semantic) of 100k and 1M synthetic 768-d
embeddings on this machine: time, peak memory, and the growth of time for 10x the data (target <= 12x).

Each size runs in its own process (so its peak resident memory is its own, read from ``ru_maxrss``). The
embeddings are drawn as CLIP-like data: ``n / 200`` random "concept" directions, each sample a concept plus
isotropic noise (cosine ~0.5 to its concept: far apart for dedup), and 10% of the samples planted as
near-duplicates of another sample (cosine ~0.98). They are generated straight into the float16 array the
dedup holds (1.5 GiB at 1M x 768), outside the timed part. The figure is the time of
:func:`semantic_pairs` (two-level k-means + within-leaf pairs) with the default settings (threshold 0.95,
cluster size 1000) on one torch thread (``MODALMILL_BENCH_TORCH_THREADS``; on a shared 2-core machine two
threads spin against other processes and were measured 2x slower); the recall of the planted pairs is reported
next to it (pairs split across clusters are SemDeDup's approximation).

    python benchmarks/bench_dedup.py              # 100k and 1M (about 10 minutes on 2 cores)
    python benchmarks/bench_dedup.py --sizes 20000,200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
B7 = "7 semantic dedup"
DIM = 768
GROWTH_TARGET = 12.0
SIZES = (100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)


def make_embeddings(n: int, dim: int = DIM, seed: int = 0, block: int = 50_000):
    """(float16 unit embeddings [n, dim], planted duplicate pairs [m, 2])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((max(1, n // 200), dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float16)
    for s in range(0, n, block):
        m = min(block, n - s)
        idx = rng.integers(0, len(concepts), m)  # drawn before the noise (the order the figures were made with)
        x = concepts[idx] + rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    n_dup = n // 10
    dst = rng.choice(n, size=2 * n_dup, replace=False)
    src, dst = dst[:n_dup], dst[n_dup:]
    for s in range(0, n_dup, block):
        a, b = src[s:s + block], dst[s:s + block]
        x = out[a].astype(np.float32) + 0.2 * rng.standard_normal((len(a), dim)).astype(np.float32) / np.sqrt(dim)
        out[b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, np.stack([np.minimum(src, dst), np.maximum(src, dst)], axis=1)


def one_size(n: int) -> dict:
    """Run in a child process: generate, dedup, measure."""
    import numpy as np

    sys.path.insert(0, os.path.dirname(HERE))
    import torch

    from modalmill.jobs.dedup.semantic import SemanticConfig, semantic_pairs

    threads = int(os.environ.get("MODALMILL_BENCH_TORCH_THREADS", "1"))
    torch.set_num_threads(threads)
    emb, planted = make_embeddings(n)
    t0 = time.perf_counter()
    pairs, _, leaf = semantic_pairs(emb, SemanticConfig())
    seconds = time.perf_counter() - t0
    found = set(map(tuple, np.sort(pairs, axis=1).tolist()))
    recall = sum(1 for p in planted.tolist() if tuple(p) in found) / max(1, len(planted))
    return {"n": n, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "array_mib": emb.nbytes / 2**20, "pairs": int(len(pairs)), "leaves": int(leaf.max() + 1),
            "planted_recall": recall, "torch_threads": threads}


def measure(sizes, log=print) -> list[dict]:
    out = []
    for n in sizes:
        log(f"bench_dedup: {n} x {DIM} embeddings ...")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n)], capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"bench_dedup child for n={n} failed: {r.stderr[-2000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        log(f"bench_dedup: {out[-1]}")
    return out


def run(log=print, quick: bool | None = None) -> list:
    """Figures for benchmarks/run.py."""
    from benchmarks.common import Figure

    quick = bool(os.environ.get("MODALMILL_BENCH_QUICK")) if quick is None else quick
    res = measure(QUICK_SIZES if quick else SIZES, log)
    figs = []
    for r in res:
        figs.append(Figure(B7, f"{r['n']:,} x {DIM}: time", r["seconds"], "s", "", None,
                           f"{r['leaves']} leaf clusters; planted-pair recall {r['planted_recall']:.3f}", r))
        figs.append(Figure(B7, f"{r['n']:,} x {DIM}: peak memory", r["peak_rss_mib"], "MiB", "", None,
                           f"the float16 embeddings alone: {r['array_mib']:.0f} MiB", r))
    ratio = res[1]["seconds"] / res[0]["seconds"]
    figs.append(Figure(B7, f"time growth for 10x the data ({res[0]['n']:,} -> {res[1]['n']:,})", ratio, "x",
                       f"<= {GROWTH_TARGET:g}", ratio <= GROWTH_TARGET))
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(one_size(a.child)))
        return 0
    res = measure([int(x) for x in a.sizes.split(",")])
    ratio = res[-1]["seconds"] / res[0]["seconds"]
    print(json.dumps({"results": res, "growth": ratio, "growth_target": GROWTH_TARGET}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
