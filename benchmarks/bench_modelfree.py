"""Benchmarks 1, 2 and 4: the model-free path (rgb, crop_settings, canny_edge, color_palette, metadata) and memory.

1. ``modalmill label`` on 2 workers against a plain single-process loop doing the same per-image work
   (:func:`benchmarks.baselines.plain_loop`); the loop's tars must be byte-identical to modalmill's.
2. ``modalmill label`` against a straightforward Ray Data script doing the same per-image work
   (:func:`benchmarks.baselines.ray_data_script`); its members must equal the loop's, sample by sample.
4. Memory with a model labeler on 12-megapixel photos at default settings: ``modalmill label`` with
   ``bench_crop_model`` (:mod:`benchmarks.crop_model`: an actor-pool labeler that reads 224 x 224 crops as DINOv2
   does) on 4000 x 3000 JPEGs (scikit-image's photos, cropped, flipped and upscaled), on a corpus 10x larger
   against the 1x corpus: the peak resident memory of the driver and of the largest Ray worker (10x / 1x <= 1.2),
   and the largest worker's peak against an absolute bound (WORKER_BOUND_MIB), with what the shard tasks held
   (``held_bytes`` of their records: the ``ray.bytes_in_flight`` bound and the most held) beside it.

Every figure is the median of ``REPEATS`` repetitions (default 3) with min and max; a ratio is the median of the
ratios of each repetition's runs (paired). Benchmarks 1 and 2 use the first ``MODELFREE_SHARDS`` shards of the
corpus (default 8: 800 images; 20 before that), a repetition running every phase once,
one after another. The CPU ratio's note splits modalmill's CPU into its shard tasks' (the work the loop does, plus
their per-shard bookkeeping and their workers' start-up) and everything else (the driver, Ray's daemons, the progress
actor, idle workers): the fixed per-run part, which weighs more the fewer images a run has.

Each phase runs in a fresh Python process (so the driver's memory is the pipeline's own), timed and watched by
:class:`benchmarks.common.Monitor`:

  loop        OpenCV on one thread: one core's worth of the work
  2 loops     two such loops side by side in two processes (alternate shards each; no Ray, no bookkeeping):
              the most that this machine's two cores give for this work, the ceiling for any pipeline
  modalmill   ``modalmill label`` (the real CLI, called in-process) on an embedded Ray with 2 CPUs started just
              before (Ray's own start is reported, not timed; worker start-up and imports are timed)
  ray data    the Ray Data script on a fresh embedded Ray with 2 CPUs, an actor pool of 2
  12mp        ``modalmill label`` with ``bench_crop_model`` on N shards of 12-megapixel JPEGs (memory only)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (MODELFREE, ROOT, WORK, Figure, Monitor, Phase, bench_env, count_images,
                               ensure_corpus, shard_pattern, start_ray, tar_digests)

MARK = "@@PHASE "
MIB = 2 ** 20
REPEATS = int(os.environ.get("MODALMILL_BENCH_REPEATS", "3"))
# of the corpus's 100 images each: 8 (800 images; 20 before that); modalmill's fixed per-run CPU (driver, Ray's
# daemons, the progress actor, worker start-up) weighs more on fewer images: the CPU ratio's note splits it out
MODELFREE_SHARDS = int(os.environ.get("MODALMILL_BENCH_MODELFREE_SHARDS", "8"))

# benchmark 4: 12-megapixel JPEGs, BIG_PER_SHARD a shard; the 1x corpus is BIG_SHARDS shards, the 10x one 10 times that
BIG_SIZE = (4000, 3000)
BIG_PER_SHARD = 16
BIG_SHARDS = int(os.environ.get("MODALMILL_BENCH_12MP_SHARDS", "1"))
BIG_QUALITY = 90
# the largest Ray worker's peak RSS at 10x must stay under this: ~280-320 MiB of a worker's own (Python, Ray, numpy,
# OpenCV, PIL, modalmill, a shard's writers; measured here) plus what one shard task holds (its samples' stored bytes,
# ~1 MB each here, and their 1000 x 750 draft decodes, 2.25 MB: ~50 MB a batch of 16), with room
WORKER_BOUND_MIB = 512


# ---------------------------------------------------------------------- phases (each in its own process)


def run_modalmill_cli(pattern: str, out: str, modalities=MODELFREE, extra=()) -> dict:
    """``modalmill label PATTERN OUT`` through the real CLI in this process; returns the run record it wrote."""
    from modalmill.cli import main

    args = ["label", pattern, out, "--modalities", ",".join(modalities), "--no-progress", *extra]
    try:
        main(args, standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    runs_dir = os.path.join(out, "_modalmill", "runs")
    with open(os.path.join(runs_dir, sorted(os.listdir(runs_dir))[-1])) as f:
        record = json.load(f)
    if code != 0:
        raise RuntimeError(f"modalmill label exited with {code}: {record.get('failed_shards')}")
    return record


def _loop_part(paths: list[str], out: str, barrier) -> None:
    """One of the '2 loops' processes: import everything, wait for the start, run the plain loop."""
    import cv2

    from benchmarks import baselines

    cv2.setNumThreads(1)
    baselines.make_labelers()  # imports and set-up before the start, as the single loop has them
    barrier.wait()
    baselines.plain_loop(paths, out, MODELFREE)


def big_corpus_dir() -> str:
    w, h = BIG_SIZE
    return os.path.join(WORK, f"corpus-12mp-{BIG_PER_SHARD}-{w}x{h}-q{BIG_QUALITY}")


def ensure_big_corpus(n_shards: int, log=print) -> list[str]:
    """``n_shards`` tar shards of 12-megapixel JPEGs (made once: each shard is written whole, then renamed)."""
    import numpy as np
    from PIL import Image

    from modalmill.jobs.democorpus import jpeg_bytes, photos, variant, write_shard

    d = big_corpus_dir()
    paths = [os.path.join(d, f"shard-{i:05d}.tar") for i in range(n_shards)]
    missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        log(f"building {len(missing)} shards of {BIG_PER_SHARD} {BIG_SIZE[0]}x{BIG_SIZE[1]} JPEGs in {d} ...")
        arrays = list(photos().values())
        for i in missing:
            samples = []
            for j in range(BIG_PER_SHARD):
                n = i * BIG_PER_SHARD + j
                arr = variant(arrays[n % len(arrays)], n // len(arrays))
                big = Image.fromarray(arr).resize(BIG_SIZE, Image.BICUBIC)
                samples.append((f"{n:08d}", {"jpg": jpeg_bytes(np.asarray(big), BIG_QUALITY)}))
            write_shard(paths[i], samples)
    return paths


def _memory_phase(n_shards: int, out: str) -> dict:
    """Benchmark 4's run: ``modalmill label`` with the crop model on ``n_shards`` 12 MP shards."""
    import ray

    from benchmarks.crop_model import NAME

    paths = ensure_big_corpus(n_shards)
    extra: dict = {"ray_start_s": start_ray(2)}
    try:
        with Monitor("12mp") as ph:
            record = run_modalmill_cli(shard_pattern(paths), out, modalities=("rgb", "crop_settings", NAME))
    finally:
        ray.shutdown()
    held = [s.get("held_bytes") or {} for s in record.get("shards", [])]
    extra.update(images=record["samples_written"], draft_decoded=sum(s.get("draft_decoded") or 0
                                                                    for s in record.get("shards", [])),
                 held_peak=max((h.get("peak", 0) for h in held), default=0),
                 held_limit=max((h.get("limit") or 0 for h in held), default=0))
    shutil.rmtree(out, ignore_errors=True)
    return {"phase": ph.as_dict(), **extra}


def _phase(kind: str, n_shards: int, out: str) -> dict:
    import ray

    from benchmarks import baselines

    paths = ensure_corpus()[:n_shards] if kind != "12mp" else []
    extra: dict = {}
    if kind == "loop":
        import cv2

        cv2.setNumThreads(1)
        with Monitor(kind) as ph:
            extra["images"] = baselines.plain_loop(paths, out, MODELFREE)
    elif kind == "2 loops":
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_loop_part, args=(paths[i::2], os.path.join(out, f"part{i}"), barrier))
                 for i in range(2)]
        for p in procs:
            p.start()
        barrier.wait(timeout=300)
        with Monitor(kind) as ph:
            for p in procs:
                p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a loop process failed: exit codes {[p.exitcode for p in procs]}")
    elif kind == "12mp":
        return _memory_phase(n_shards, out)
    elif kind == "modalmill":
        extra["ray_start_s"] = start_ray(2)
        try:
            with Monitor(kind) as ph:
                record = run_modalmill_cli(shard_pattern(paths), out)
        finally:
            ray.shutdown()
        extra["images"] = record["samples_written"]
        stages: dict[str, float] = {}
        for s in record.get("shards", []):
            for k, v in (s.get("seconds") or {}).items():
                stages[k] = round(stages.get(k, 0.0) + v, 2)
        extra["shard_stage_seconds"] = stages
    elif kind == "ray data":
        extra["ray_start_s"] = start_ray(2)
        try:
            with Monitor(kind) as ph:
                baselines.ray_data_script(paths, out, MODELFREE, workers=2)
        finally:
            ray.shutdown()
    else:
        raise ValueError(kind)
    return {"phase": ph.as_dict(), **extra}


def run_phase(kind: str, n_shards: int, out: str, log=print) -> tuple[Phase, dict]:
    """Run one phase in a fresh Python process; returns its Phase and extras."""
    cmd = [sys.executable, "-m", "benchmarks.bench_modelfree", "--phase", kind, "--shards", str(n_shards),
           "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"phase {kind!r} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    data = json.loads(lines[-1][len(MARK):])
    ph = Phase.from_dict(data.pop("phase"))
    log(f"  {kind:10s} {ph.wall_s:7.1f} s  {ph.own_cpu_s:7.1f} CPU s  ({ph.own_cores:.2f} cores; other processes "
        f"used {ph.foreign_cores:.2f})")
    return ph, data


# ---------------------------------------------------------------------- the benchmark


def _same_as_loop(rd_out: str, loop_out: str, shards: list[str]) -> bool:
    from benchmarks.baselines import ray_data_members
    from modalmill.io.writers import iter_tar_members

    got = ray_data_members(rd_out)
    n = 0
    for m in MODELFREE:
        for s in shards:
            for key, _, data in iter_tar_members(os.path.join(loop_out, m, f"{s}.tar")):
                n += 1
                if got.get(key, {}).get(m) != data:
                    return False
    return n == len(got) * len(MODELFREE)


def _disturbance(*phases: Phase) -> str:
    busy = [p for p in phases if p.disturbed]
    if not busy:
        return ""
    return ("shared machine: other processes used " +
            ", ".join(f"{p.foreign_cores:.2f} cores during '{p.name}'" for p in busy))


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


B1, B2, B4 = "1. model-free path: scaling", "2. against a Ray Data script", "4. memory"


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _of(values: list[float], digits: int = 3) -> tuple[float, str]:
    """(the median, rounded; 'median of N repetitions (min, max)')."""
    sp = _spread(values)
    return round(sp["median"], digits), f"median of {sp['n']} repetitions (min {sp['min']:.3g}, max {sp['max']:.3g})"


def _repetition(paths: list[str], base: str, log) -> dict:
    """One repetition of benchmarks 1 and 2: every phase once, their outputs compared, then removed."""
    shards = [f"shard-{i:05d}" for i in range(len(paths))]
    out = {k: os.path.join(base, k.replace(" ", "")) for k in ("loop", "2 loops", "modalmill", "ray data")}
    ph, extra = {}, {}
    for kind in out:
        ph[kind], extra[kind] = run_phase(kind, len(paths), out[kind], log)
    same = tar_digests(out["loop"], MODELFREE, shards) == tar_digests(out["modalmill"], MODELFREE, shards)
    rd_same = _same_as_loop(out["ray data"], out["loop"], shards)
    shutil.rmtree(base, ignore_errors=True)
    return {"phases": ph, "extra": extra, "same": same, "rd_same": rd_same}


def _shard_task_cpu(ph: Phase) -> float:
    """CPU seconds of modalmill's shard-task workers (``ray::_run_shard``) in a phase."""
    return sum(v for k, v in ph.cpu_by_process.items() if "_run_shard" in k)


def _scaling_figures(reps: list[dict], n_images: int) -> list[Figure]:
    """Benchmarks 1 and 2 from the repetitions: medians with min and max, ratios paired per repetition."""
    rate = {k: [n_images / r["phases"][k].wall_s for r in reps] for k in ("loop", "2 loops", "modalmill", "ray data")}
    pair = lambda a, b: [x / y for x, y in zip(rate[a], rate[b])]  # noqa: E731
    same, rd_same = all(r["same"] for r in reps), all(r["rd_same"] for r in reps)
    last = reps[-1]["phases"]
    mm_phases = [r["phases"]["modalmill"] for r in reps]
    cpu = [r["phases"]["modalmill"].own_cpu_s / r["phases"]["loop"].own_cpu_s for r in reps]
    in_tasks = [_shard_task_cpu(r["phases"]["modalmill"]) for r in reps]
    task_ratio = [t / r["phases"]["loop"].own_cpu_s for t, r in zip(in_tasks, reps)]
    outside = [r["phases"]["modalmill"].own_cpu_s - t for t, r in zip(in_tasks, reps)]
    free = [p.own_cpu_s / max(1e-9, 2 * p.wall_s - max(0.0, p.machine_cpu_s - p.own_cpu_s)) for p in mm_phases]
    disturbed = _disturbance(*[p for r in reps for p in r["phases"].values()])
    figs: list[Figure] = []

    def fig(bench, name, values, unit, target="", met=None, note="", **detail):
        v, spread = _of(values)
        figs.append(Figure(bench, name, v, unit, target, met, _join(spread, note), detail=detail))

    fig(B1, "plain single-process loop", rate["loop"], "images/s", note=f"{n_images} images (the corpus's first "
        f"{MODELFREE_SHARDS} shards); "
        f"{last['loop'].own_cores:.2f} cores used", loop=last["loop"].summary())
    fig(B1, "modalmill label, 2 workers", rate["modalmill"], "images/s",
        note="Ray start before timing, not included", modalmill=last["modalmill"].summary(),
        shard_stage_seconds=reps[-1]["extra"]["modalmill"]["shard_stage_seconds"])
    ratio = _spread(pair("modalmill", "loop"))["median"]
    fig(B1, "modalmill (2 workers) / plain loop", pair("modalmill", "loop"), "x", ">= 1.7", bool(same and ratio >= 1.7),
        _join("tars byte-identical to the loop's in every repetition" if same else
              "INVALID: modalmill's tars differ from the loop's", disturbed))
    fig(B1, "CPU time of modalmill (all its processes) / CPU time of the loop", cpu, "x", "<= 1.15",
        bool(same and _spread(cpu)["median"] <= 1.15),
        f"Ray + bookkeeping over the work's own CPU time; its shard tasks alone / the loop: "
        f"{_of(task_ratio)[0]:.3g}x (min {min(task_ratio):.3g}, max {max(task_ratio):.3g}); outside the shard tasks "
        f"(driver, Ray's daemons, the progress actor, idle workers: fixed per run): {statistics.median(outside):.1f} "
        f"CPU s (min {min(outside):.1f}, max {max(outside):.1f}) against the loop's "
        f"{statistics.median(r['phases']['loop'].own_cpu_s for r in reps):.1f}",
        cpu_s={"loop": [round(r["phases"]["loop"].own_cpu_s, 1) for r in reps],
               "modalmill_shard_tasks": [round(t, 1) for t in in_tasks],
               "modalmill_outside": [round(o, 1) for o in outside]},
        modalmill_cpu_by_process=[r["phases"]["modalmill"].cpu_by_process for r in reps])
    fig(B1, "two plain loops side by side (no Ray) / one plain loop", pair("2 loops", "loop"), "x",
        note="this machine's own ceiling for the work on 2 cores: the same loop in two processes at once",
        loops=last["2 loops"].summary())
    fig(B1, "modalmill (2 workers) / two plain loops side by side", pair("modalmill", "2 loops"), "x",
        note="how much of the machine's ceiling modalmill reaches")
    fig(B1, "modalmill's use of the CPU other processes left free", free, "",
        note="1.0: both cores busy with modalmill whenever nobody else used them")
    fig(B2, "Ray Data script, actor pool of 2", rate["ray data"], "images/s",
        note="Ray start before timing, not included", raydata=last["ray data"].summary())
    rd = _spread(pair("modalmill", "ray data"))["median"]
    fig(B2, "modalmill / Ray Data script", pair("modalmill", "ray data"), "x", ">= 1.0",
        bool(same and rd_same and rd >= 1.0),
        _join("same bytes per sample as the loop in every repetition" if rd_same else
              "INVALID: the Ray Data output differs from the loop's", disturbed))
    return figs


def _memory_figures(reps: list[tuple[tuple[Phase, dict], tuple[Phase, dict]]], big: int, small: int) -> list[Figure]:
    """Benchmark 4 from the repetitions' (10x, 1x) runs: ratios paired per repetition, the absolute bound."""
    worker = lambda ph: max(ph.worker_peak_rss.values(), default=0)  # noqa: E731
    figs: list[Figure] = []
    for who, peak in (("driver", lambda ph: ph.driver_peak_rss), ("largest Ray worker", worker)):
        ratios = [peak(b) / peak(s) if peak(s) else float("nan") for (b, _), (s, _) in reps]
        v, spread = _of(ratios)
        mibs = ", ".join(f"{peak(b) / MIB:.0f} vs {peak(s) / MIB:.0f}" for (b, _), (s, _) in reps)
        figs.append(Figure(B4, f"peak RSS of the {who}: {big} / {small} 12-megapixel images", v, "x", "<= 1.2",
                           bool(v <= 1.2), _join(spread, f"MiB per repetition: {mibs}")))
    peaks = [worker(b) / MIB for (b, _), _ in reps]
    v, spread = _of(peaks, 1)
    x = reps[-1][0][1]
    figs.append(Figure(B4, f"peak RSS of the largest Ray worker: {big} 12-megapixel images", v, "MiB",
                       f"<= {WORKER_BOUND_MIB}", bool(max(peaks) <= WORKER_BOUND_MIB),
                       _join(spread, f"every repetition must stay under the bound; a shard task held at most "
                             f"{x['held_peak'] / MIB:.0f} MiB of samples (its ray.bytes_in_flight bound: "
                             f"{x['held_limit'] / MIB:.0f} MiB, the default); {x['draft_decoded']} of "
                             f"{x['images']} images decoded reduced (JPEG draft, for 224 px crops)"),
                       detail={"workers_mib": sorted(round(w / MIB) for w in reps[-1][0][0].worker_peak_rss.values())}))
    return figs


def run(log=print) -> list[Figure]:
    paths = ensure_corpus(log)[:max(1, MODELFREE_SHARDS)]
    n_images = count_images(paths)
    base = os.path.join(WORK, "modelfree")
    shutil.rmtree(base, ignore_errors=True)
    log(f"model-free path: {n_images} images in {len(paths)} shards, {REPEATS} repetitions")
    reps = []
    for i in range(REPEATS):
        log(f" repetition {i + 1}")
        reps.append(_repetition(paths, base, log))
    figs = _scaling_figures(reps, n_images)

    big_paths = ensure_big_corpus(10 * BIG_SHARDS, log)
    big, small = 10 * BIG_SHARDS * BIG_PER_SHARD, BIG_SHARDS * BIG_PER_SHARD
    log(f"memory: {big} against {small} {BIG_SIZE[0]}x{BIG_SIZE[1]} JPEGs with a model labeler, {REPEATS} repetitions "
        f"({len(big_paths)} shards)")
    mem = []
    for _ in range(REPEATS):
        mem.append((run_phase("12mp", 10 * BIG_SHARDS, os.path.join(base, "12mp"), log),
                    run_phase("12mp", BIG_SHARDS, os.path.join(base, "12mp"), log)))
    shutil.rmtree(base, ignore_errors=True)
    return figs + _memory_figures(mem, big, small)


if __name__ == "__main__":
    bench_env()
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["loop", "2 loops", "modalmill", "ray data", "12mp"])
    ap.add_argument("--shards", type=int)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.phase:
        result = _phase(a.phase, a.shards, a.out)
        print(MARK + json.dumps(result), flush=True)
    else:
        for fig in run():
            print(json.dumps(fig.as_dict()))
