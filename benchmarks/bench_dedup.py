"""Benchmark 7: semantic deduplication (SemDeDup, modalmill.jobs.dedup.semantic) of 100k and 1M synthetic 768-d
embeddings on this machine, as ``modalmill dedup --method semantic`` runs it: the k-means assignment and the
within-cluster pairs as Ray tasks (:func:`semantic_pairs_ray`) on an embedded Ray of 2 CPUs, over blocks of
1,000 rows in Ray's object store (one block per output shard of 1,000 samples). Time, peak memory, and the
growth of time for 10x the data (target <= 12x).

Each size runs in its own process with its own Ray. The embeddings are drawn as CLIP-like data: ``n / 200``
random "concept" directions, each sample a concept plus isotropic noise (cosine ~0.7 to its concept: far apart
for dedup), and 10% of the samples planted as near-duplicates of another sample (cosine ~0.98); they are made
and put into the object store before the timed part (where the dedup job's shard tasks would have left them).
The timed part is :func:`semantic_pairs_ray` with the default settings (threshold 0.95, cluster size 1000),
after one untimed run on 10,000 rows that starts the workers, repeated (``REPEATS``: the median, min and max are
reported). Peak memory is the largest sum, sampled every 3 s during the timed runs (reading the processes'
``smaps_rollup`` costs the driver CPU time in proportion to the memory mapped: sampled every 0.5 s it took 62 s
of CPU at 1M), of the proportional set size (PSS: shared pages split among the processes that map
them, so the object store counts once) of the driver and every process it started (Ray's daemons, its object
store, its workers); the embedding blocks alone are ``n * 768 * 2`` bytes of it. The recall of the planted
pairs is reported next to the time (pairs split across clusters are SemDeDup's approximation).

    python benchmarks/bench_dedup.py              # 100k and 1M (3 minutes on 2 idle cores)
    python benchmarks/bench_dedup.py --sizes 20000,200000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
B7 = "7 semantic dedup"
DIM = 768
GROWTH_TARGET = 12.0
SIZES = (100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
REPEATS = {100_000: 3, 1_000_000: 2}  # sizes not listed: 3
BLOCK_ROWS = 1000


def make_embeddings(n: int, dim: int = DIM, seed: int = 0, block: int = 50_000):
    """(float16 unit embeddings [n, dim], planted duplicate pairs [m, 2])."""
    import numpy as np
    import torch

    def unit(x):
        t = torch.from_numpy(x)
        return (t / t.norm(dim=1, keepdim=True)).half().numpy()

    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((max(1, n // 200), dim), dtype=np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float16)
    for s in range(0, n, block):
        m = min(block, n - s)
        idx = rng.integers(0, len(concepts), m)
        out[s:s + m] = unit(concepts[idx] + rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim))
    n_dup = n // 10
    dst = rng.choice(n, size=2 * n_dup, replace=False)
    src, dst = dst[:n_dup], dst[n_dup:]
    for s in range(0, n_dup, block):
        a, b = src[s:s + block], dst[s:s + block]
        noise = 0.2 * rng.standard_normal((len(a), dim), dtype=np.float32) / np.sqrt(dim)
        out[b] = unit(out[a].astype(np.float32) + noise)
    return out, np.stack([np.minimum(src, dst), np.maximum(src, dst)], axis=1)


class PssMeter:
    """The peak, over samples every ``interval`` s, of the summed PSS of this process and its descendants."""

    def __init__(self, interval: float = 3.0):
        import psutil

        self.me, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    @staticmethod
    def pss(pid: int) -> int:
        """Bytes of PSS from ``/proc/PID/smaps_rollup`` (one line to parse, unlike the full smaps)."""
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def sample(self) -> int:
        import psutil

        try:
            pids = [self.me.pid] + [p.pid for p in self.me.children(recursive=True)]
        except psutil.Error:
            pids = [self.me.pid]
        total = sum(self.pss(pid) for pid in pids)
        self.peak = max(self.peak, total)
        return total

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        return False


def one_size(n: int, repeats: int) -> dict:
    """Run in a child process: generate, put into Ray, dedup ``repeats`` times, measure."""
    import numpy as np

    sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks.common import Monitor, bench_env, start_ray

    bench_env()
    import ray

    from modalmill.jobs.dedup.semantic import SemanticConfig, semantic_pairs_ray

    emb, planted = make_embeddings(n)
    start_ray(2)
    blocks = [(s, ray.put(emb[s:s + BLOCK_ROWS])) for s in range(0, n, BLOCK_ROWS)]
    array_mib = emb.nbytes / 2**20
    del emb
    # one untimed run on the first 10,000 rows starts and warms the workers (in `modalmill dedup`, the shard
    # tasks that read the embeddings have done that)
    semantic_pairs_ray(blocks[:10], min(n, 10 * BLOCK_ROWS), SemanticConfig())
    runs = []
    with PssMeter() as mem:
        base = mem.sample()
        for _ in range(repeats):
            with Monitor("semantic dedup") as phase:
                pairs, _, leaf = semantic_pairs_ray(blocks, n, SemanticConfig())
            runs.append({"seconds": phase.wall_s, "cpu_s": phase.own_cpu_s, "other_cores": phase.foreign_cores,
                         "cpu_by_process": phase.cpu_by_process})
    ray.shutdown()
    found = set(map(tuple, np.sort(pairs, axis=1).tolist()))
    recall = sum(1 for p in planted.tolist() if tuple(p) in found) / max(1, len(planted))
    secs = [r["seconds"] for r in runs]
    return {"n": n, "seconds": statistics.median(secs), "min_s": min(secs), "max_s": max(secs), "runs": runs,
            "peak_pss_mib": mem.peak / 2**20, "before_pss_mib": base / 2**20, "array_mib": array_mib,
            "pairs": int(len(pairs)), "leaves": int(leaf.max() + 1), "planted_recall": recall,
            "blocks": len(blocks), "ray_cpus": 2}


def measure(sizes, log=print) -> list[dict]:
    out = []
    for n in sizes:
        log(f"bench_dedup: {n} x {DIM} embeddings ...")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), "--repeats",
                            str(REPEATS.get(n, 3))], capture_output=True, text=True, check=False)
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
        figs.append(Figure(B7, f"{r['n']:,} x {DIM}: time (Ray, 2 CPUs)", r["seconds"], "s", "", None,
                           f"median of {len(r['runs'])}; min {r['min_s']:.1f}, max {r['max_s']:.1f}; "
                           f"{r['leaves']} leaf clusters; planted-pair recall {r['planted_recall']:.3f}", r))
        figs.append(Figure(B7, f"{r['n']:,} x {DIM}: peak memory (driver + Ray, PSS)", r["peak_pss_mib"], "MiB", "",
                           None, f"the float16 embedding blocks alone: {r['array_mib']:.0f} MiB; "
                           f"{r['before_pss_mib']:.0f} MiB before the timed runs", r))
    ratio = res[1]["seconds"] / res[0]["seconds"]
    figs.append(Figure(B7, f"time growth for 10x the data ({res[0]['n']:,} -> {res[1]['n']:,})", ratio, "x",
                       f"<= {GROWTH_TARGET:g}", ratio <= GROWTH_TARGET))
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(one_size(a.child, a.repeats)))
        return 0
    res = measure([int(x) for x in a.sizes.split(",")])
    ratio = res[-1]["seconds"] / res[0]["seconds"]
    print(json.dumps({"results": res, "growth": ratio, "growth_target": GROWTH_TARGET}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
