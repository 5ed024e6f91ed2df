"""Benchmarks 1, 2 and 4: the model-free path (rgb, crop_settings, canny_edge, color_palette, metadata).

1. ``modalmill label`` on 2 workers against a plain single-process loop doing the same per-image work
   (:func:`benchmarks.baselines.plain_loop`); the loop's tars must be byte-identical to modalmill's.
2. ``modalmill label`` against a straightforward Ray Data script doing the same per-image work
   (:func:`benchmarks.baselines.ray_data_script`); its members must equal the loop's, sample by sample.
4. Peak resident memory of the driver and of each Ray worker on the full corpus against a corpus 10x smaller.

Each phase runs in a fresh Python process (so the driver's memory is the pipeline's own), timed and watched by
:class:`benchmarks.common.Monitor`:

  loop        OpenCV on one thread: one core's worth of the work
  2 loops     two such loops side by side in two processes (alternate shards each; no Ray, no bookkeeping):
              the most that this machine's two cores give for this work, the ceiling for any pipeline
  modalmill   ``modalmill label`` (the real CLI, called in-process) on an embedded Ray with 2 CPUs started just
              before (Ray's own start is reported, not timed; worker start-up and imports are timed)
  small       the same on the first 1/10 of the corpus (memory only)
  ray data    the Ray Data script on a fresh embedded Ray with 2 CPUs, an actor pool of 2
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (MODELFREE, ROOT, WORK, Figure, Monitor, Phase, bench_env, count_images,
                               ensure_corpus, shard_pattern, start_ray, tar_digests)

MARK = "@@PHASE "
MIB = 2 ** 20


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


def _phase(kind: str, n_shards: int, out: str) -> dict:
    import ray

    from benchmarks import baselines

    paths = ensure_corpus()[:n_shards]
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
    elif kind in ("modalmill", "small"):
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


def run(log=print) -> list[Figure]:
    paths = ensure_corpus(log)
    n_images = count_images(paths)
    n_small = max(1, len(paths) // 10)
    small_images = count_images(paths[:n_small])
    shards = [f"shard-{i:05d}" for i in range(len(paths))]
    base = os.path.join(WORK, "modelfree")
    shutil.rmtree(base, ignore_errors=True)
    out = {k: os.path.join(base, k.replace(" ", "")) for k in ("loop", "2 loops", "modalmill", "small", "ray data")}

    log(f"model-free path: {n_images} images in {len(paths)} shards (memory: also {small_images} in {n_small})")
    loop, _ = run_phase("loop", len(paths), out["loop"], log)
    loops2, _ = run_phase("2 loops", len(paths), out["2 loops"], log)
    mm, mm_x = run_phase("modalmill", len(paths), out["modalmill"], log)
    small, small_x = run_phase("small", n_small, out["small"], log)
    rd, rd_x = run_phase("ray data", len(paths), out["ray data"], log)

    same = tar_digests(out["loop"], MODELFREE, shards) == tar_digests(out["modalmill"], MODELFREE, shards)
    rd_same = _same_as_loop(out["ray data"], out["loop"], shards)
    shutil.rmtree(base, ignore_errors=True)

    B1, B2, B4 = "1. model-free path: scaling", "2. against a Ray Data script", "4. memory"
    loop_rate, mm_rate, rd_rate = n_images / loop.wall_s, n_images / mm.wall_s, n_images / rd.wall_s
    figs: list[Figure] = []
    figs.append(Figure(B1, "plain single-process loop", round(loop_rate, 2), "images/s",
                       note=f"{n_images} images; {loop.own_cores:.2f} cores used",
                       detail={"loop": loop.summary()}))
    figs.append(Figure(B1, "modalmill label, 2 workers", round(mm_rate, 2), "images/s",
                       note=f"Ray start {mm_x['ray_start_s']:.1f} s before timing, not included",
                       detail={"modalmill": mm.summary(), "shard_stage_seconds": mm_x["shard_stage_seconds"]}))
    ratio = mm_rate / loop_rate
    figs.append(Figure(B1, "modalmill (2 workers) / plain loop", round(ratio, 3), "x", ">= 1.7",
                       met=bool(same and ratio >= 1.7),
                       note=_join("" if same else "INVALID: modalmill's tars differ from the loop's",
                                  "tars byte-identical to the loop's" if same else "", _disturbance(loop, mm))))
    cpu_ratio = mm.own_cpu_s / loop.own_cpu_s
    figs.append(Figure(B1, "CPU time of modalmill (all its processes) / CPU time of the loop", round(cpu_ratio, 3),
                       "x", "<= 1.15", met=bool(same and cpu_ratio <= 1.15),
                       note=f"Ray + bookkeeping = {100 * (cpu_ratio - 1):+.1f}% of the work's CPU time"))
    loops2_rate = n_images / loops2.wall_s
    figs.append(Figure(B1, "two plain loops side by side (no Ray) / one plain loop", round(loops2_rate / loop_rate, 3),
                       "x", note=_join("this machine's own ceiling for the work on 2 cores: the same loop in two "
                                       f"processes at once ({loops2.own_cores:.2f} cores used; CPU time "
                                       f"{loops2.own_cpu_s / loop.own_cpu_s:.2f} x the single loop's)",
                                       _disturbance(loops2)),
                       detail={"2 loops": loops2.summary()}))
    figs.append(Figure(B1, "modalmill (2 workers) / two plain loops side by side", round(mm_rate / loops2_rate, 3), "x",
                       note="how much of the machine's ceiling modalmill reaches"))
    avail = max(1e-9, 2 * mm.wall_s - max(0.0, mm.machine_cpu_s - mm.own_cpu_s))
    figs.append(Figure(B1, "modalmill's use of the CPU other processes left free", round(mm.own_cpu_s / avail, 3),
                       note="1.0: both cores busy with modalmill whenever nobody else used them"))

    figs.append(Figure(B2, "Ray Data script, actor pool of 2", round(rd_rate, 2), "images/s",
                       note=f"Ray start {rd_x['ray_start_s']:.1f} s before timing, not included",
                       detail={"ray data": rd.summary()}))
    rd_ratio = mm_rate / rd_rate
    figs.append(Figure(B2, "modalmill / Ray Data script", round(rd_ratio, 3), "x", ">= 1.0",
                       met=bool(same and rd_same and rd_ratio >= 1.0),
                       note=_join("" if rd_same else "INVALID: the Ray Data output differs from the loop's",
                                  "same bytes per sample as the loop" if rd_same else "", _disturbance(mm, rd))))

    for who, big, little in (("driver", mm.driver_peak_rss, small.driver_peak_rss),
                             ("largest Ray worker", max(mm.worker_peak_rss.values(), default=0),
                              max(small.worker_peak_rss.values(), default=0))):
        r = big / little if little else float("nan")
        figs.append(Figure(B4, f"peak RSS of the {who}: {n_images} images / {small_images} images", round(r, 3), "x",
                           "<= 1.2", met=bool(little and r <= 1.2),
                           note=f"{big / MIB:.0f} MiB vs {little / MIB:.0f} MiB",
                           detail={"workers_large_mib": sorted(round(v / MIB) for v in mm.worker_peak_rss.values()),
                                   "workers_small_mib": sorted(round(v / MIB)
                                                               for v in small.worker_peak_rss.values())}))
    return figs


if __name__ == "__main__":
    bench_env()
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["loop", "2 loops", "modalmill", "small", "ray data"])
    ap.add_argument("--shards", type=int)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.phase:
        result = _phase(a.phase, a.shards, a.out)
        print(MARK + json.dumps(result), flush=True)
    else:
        for fig in run():
            print(json.dumps(fig.as_dict()))
