"""Corpus-scale bookkeeping: no-op rerun, status, stats, load_dataset start-up and time to the first shard task
at 1k and 10k output shards, locally and on the loopback S3 server behind a proxy that adds latency to every
request (``make bench-scale``; writes its section of benchmarks/RESULTS.md).

    python benchmarks/bench_scale.py                          # 1000,10000 shards; local and S3 at 20 ms
    python benchmarks/bench_scale.py --sizes 1000 --latency-ms 20 --backends s3

How the outputs are made: the real job (rgb + crop_settings, embedded Ray) labels a small template corpus of 4
input shards (2 tiny images each); its output is then cloned to N shards — every clone has its own marker (its
own shard name, index and input url), the template's manifest and tars, and one run record says
``shards_total = N`` — so the bookkeeping sees exactly what a real N-shard output holds, without labelling N
shards on a 2-core machine. On S3 the clone is uploaded straight to SeaweedFS (not timed), and every timed
operation then goes through ``tests.fixtures_s3.FlakyProxy`` with ``delay(latency)``: each request waits that
long before it is forwarded, as at a real object store.

Timed, one after another, on each output:

- ``index cold``: the first scan of an output whose shard index is missing (an output written before the index
  existed): every marker and manifest is read once (bounded parallel), and the run stores the index;
- ``no-op rerun``: ``run_job`` of the same job (every shard done): listings + the index, nothing read;
- ``status``: ``output_status``; ``stats``: ``corpus_stats`` (this one reads every tar: it grows with the data);
- ``load_dataset start-up``: ``load_dataset(root, ["rgb"])`` until it returns, and until the first sample;
The quick figures (no-op rerun, status, load_dataset, first task planned) are each the median of 3 timings.

- ``time to first shard task``: ``run_job`` of the job with one more modality (every shard needs an update
  task), from the call until the first task is handed to Ray (Ray's own start included); the run is then
  stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

START, END = "<!-- bench-scale: start -->", "<!-- bench-scale: end -->"
TEMPLATE_SHARDS = 4
REPEAT = 3  # the quick figures are the median of 3 timings
TARGET_S = 15.0  # no-op rerun and status of 10k shards at 20 ms, each


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stop(Exception):
    """Raised from on_submit: the benchmark only wants the time to the first task."""


def make_template(work: str) -> tuple[str, str]:
    """A real output of TEMPLATE_SHARDS shards (the job this benchmark measures); returns (output, input dir)."""
    from modalmill.jobs.democorpus import jpeg_bytes, photos, write_shard
    from modalmill.jobs.runner import run_job

    inp = os.path.join(work, "input")
    pics = photos()
    names = sorted(pics)
    for i in range(TEMPLATE_SHARDS):
        write_shard(os.path.join(inp, f"shard-{i:05d}.tar"),
                    [(f"k{j}", {"jpg": jpeg_bytes(pics[names[(i + j) % len(names)]][:48, :48])}) for j in range(2)])
    out = os.path.join(work, "template")
    run_job(job(os.path.join(inp, f"shard-{{00000..{TEMPLATE_SHARDS - 1:05d}}}.tar"), out), show_progress=False)
    return out, inp


def job(inp: str, out: str, extra: tuple[str, ...] = ()):
    from modalmill.jobs.spec import job_from_dict

    return job_from_dict({"input": inp, "output": out, "modalities": ["rgb", "crop_settings", *extra],
                          "batch_size": 2, "crops": {"n_crops": 1}, "decode": {"max_size": 48},
                          "ray": {"num_cpus": 2}})


def clone_files(template: str, n: int, inp_pattern_dir: str) -> dict[str, bytes]:
    """{relative path: content} of an n-shard output cloned from the template."""
    from modalmill.io import manifest

    files: dict[str, bytes] = {}
    t_markers = {i: manifest.read_marker(template, f"shard-{i:05d}") for i in range(TEMPLATE_SHARDS)}
    blobs = {}
    for i in range(TEMPLATE_SHARDS):
        name = f"shard-{i:05d}"
        for m in ("rgb", "crop_settings"):
            blobs[(m, i)] = open(os.path.join(template, m, f"{name}.tar"), "rb").read()
        blobs[("manifest", i)] = open(os.path.join(template, "_modalmill", "manifest", f"{name}.parquet"), "rb").read()
    for s in range(n):
        i = s % TEMPLATE_SHARDS
        name = f"shard-{s:05d}"
        for m in ("rgb", "crop_settings"):
            files[f"{m}/{name}.tar"] = blobs[(m, i)]
        files[f"_modalmill/manifest/{name}.parquet"] = blobs[("manifest", i)]
        mk = dict(t_markers[i], shard=name, index=s, source=os.path.join(inp_pattern_dir, f"{name}.tar"))
        files[f"_modalmill/shards/{name}.json"] = json.dumps(mk, indent=1, sort_keys=True).encode()
    runs = [json.loads(open(os.path.join(template, "_modalmill", "runs", f)).read())
            for f in sorted(os.listdir(os.path.join(template, "_modalmill", "runs")))]
    run = dict(runs[-1], shards_total=n, shards_selected=n, shards_processed=n, shards=[])
    files[f"_modalmill/runs/{run['run_id']}.json"] = json.dumps(run, indent=1).encode()
    return files


def write_local(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def write_s3(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    def put(item):
        rel, data = item
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, files.items()))


def measure(root: str, inp_dir: str, n: int) -> dict[str, float]:
    from modalmill.dataset import load_dataset
    from modalmill.io import index, storage
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.stats import corpus_stats
    from modalmill.jobs.status import output_status

    pattern = os.path.join(inp_dir, f"shard-{{00000..{n - 1:05d}}}.tar")
    spec = job(pattern, root)
    res: dict[str, float] = {}

    def timed(name, fn, repeat: int = 1):
        """The median of ``repeat`` timings (the machine is shared: one slow outlier must not be the figure)."""
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        res[name] = sorted(times)[len(times) // 2]
        log(f"  {name}: {res[name]:.2f} s" + (f" (median of {', '.join(f'{x:.2f}' for x in times)})"
                                              if repeat > 1 else ""))
        return out

    storage.remove(index.index_url(root))
    s = timed("index_cold", lambda: run_job(spec, show_progress=False))
    assert s["shards_skipped"] == n and s["planning"]["markers_read"] == n, s["planning"]
    s = timed("noop_rerun", lambda: run_job(spec, show_progress=False), REPEAT)
    assert s["shards_skipped"] == n and s["planning"]["markers_read"] == 0, s["planning"]
    st = timed("status", lambda: output_status(root), REPEAT)
    assert st["shards_done"] == n and st["shards_pending"] == 0, st
    timed("stats", lambda: corpus_stats(root))
    ds = timed("load_dataset", lambda: load_dataset(root, ["rgb"], decode=False), REPEAT)
    assert len(ds.shards) == n
    t = time.perf_counter()
    next(iter(load_dataset(root, ["rgb"], decode=False)))
    res["load_dataset_first_sample"] = time.perf_counter() - t
    log(f"  load_dataset_first_sample: {res['load_dataset_first_sample']:.2f} s")

    from modalmill.jobs.runner import plan_pages, prepare_job

    def first_planned():
        for page in plan_pages(prepare_job(job(pattern, root, extra=("canny_edge",)))):
            if page.tasks:
                return

    timed("first_task_planned", first_planned, REPEAT)

    t = time.perf_counter()

    def stop(_task):
        res["first_task"] = time.perf_counter() - t
        raise Stop

    try:
        run_job(job(pattern, root, extra=("canny_edge",)), show_progress=False, on_submit=stop)
        raise RuntimeError("the run ended without submitting a task")
    except Stop:
        pass
    log(f"  first_task: {res['first_task']:.2f} s")
    return res


def run_local(work: str, template: str, inp: str, n: int) -> dict:
    root = os.path.join(work, f"local-{n}")
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    write_local(root, clone_files(template, n, inp))
    log(f"local {n}: cloned in {time.perf_counter() - t:.0f} s")
    try:
        return measure(root, inp, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_s3(server, proxy, template: str, inp: str, n: int, latency: float) -> dict:
    from modalmill.io import storage

    bucket = server.make_bucket(f"scale-{n}-{int(time.time())}")
    t = time.perf_counter()
    write_s3(server.client(max_pool_connections=40), bucket, "out", clone_files(template, n, inp))
    log(f"s3 {n}: uploaded in {time.perf_counter() - t:.0f} s")
    os.environ.update(proxy.env())
    storage.clear_s3_client_cache()
    proxy.delay(latency)
    try:
        return measure(f"s3://{bucket}/out", inp, n)
    finally:
        proxy.delay(0)


FIGURES = [  # (key, label, target for 10k at 20 ms)
    ("noop_rerun", "no-op rerun", f"< {TARGET_S:g} s at 10k, 20 ms; flat per 1k"),
    ("status", "`status`", f"< {TARGET_S:g} s at 10k, 20 ms; flat per 1k"),
    ("stats", "`stats` (reads every tar)", "flat per 1k"),
    ("load_dataset", "`load_dataset` start-up", "flat per 1k"),
    ("load_dataset_first_sample", "`load_dataset` start-up to first sample", "flat per 1k"),
    ("first_task_planned", "time to first shard task planned (listing + index, no Ray)", "flat per 1k"),
    ("first_task", "time to first shard task submitted (Ray start and actor pools included)", "flat per 1k"),
    ("index_cold", "no-op rerun without an index (first scan; stores it)", "—"),
]


def render(results: dict, info: dict) -> str:
    lines = [START, "## 7. corpus-scale bookkeeping (`make bench-scale`)", "",
             f"Written by `{info['command']}` on {info['date']} in {info['duration_s'] / 60:.1f} minutes "
             f"(modalmill {info['commit']}). "
             f"Machine: {info['machine']}; load average {info['load_before']} before, {info['load_after']} after. "
             "**The machine was shared with other engineers' test runs while this ran, so every timing is noisy "
             "(the load average above says how busy it was); rerun on a quiet machine for clean figures.**", "",
             "Outputs of N shards of 2 tiny images (rgb + crop_settings), cloned from a real run (see "
             "`benchmarks/bench_scale.py`). S3: SeaweedFS on loopback behind the tests' FlakyProxy with "
             f"{info['latency_ms']:g} ms added to every request; local: the local disk. \"per 1k\": seconds per "
             "1,000 shards. \"flat\": the 10k figure per 1k shards is at most 1.5 x the 1k one. The quick figures "
             "are medians of 3 timings. For comparison, the one-request-per-shard code this replaced took, for "
             "1,000 shards and *without* added latency, 1.1 s (no-op rerun) and 2.7 s (`status`) locally, 4.0 s and "
             "10.4 s on this S3 server (issue 17). \"submitted\" is dominated by Ray's start on this loaded "
             "machine, which does not depend on the shard count.", "",
             "| backend | figure | 1k shards | 10k shards | per 1k at 1k | per 1k at 10k | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for backend in ("s3", "local"):
        by_n = results.get(backend, {})
        if not by_n:
            continue
        for key, label, target in FIGURES:
            vals = {n: r.get(key) for n, r in by_n.items()}
            v1, v10 = vals.get(1000), vals.get(10000)
            p1 = v1 / 1 if v1 is not None else None
            p10 = v10 / 10 if v10 is not None else None
            met = "—"
            if key in ("noop_rerun", "status") and backend == "s3" and v10 is not None:
                ok = v10 < TARGET_S and (p1 is None or p10 <= 1.5 * p1)
                met = "**met**" if ok else "**not met**"
            elif target != "—" and p1 is not None and p10 is not None:
                met = "**met**" if p10 <= 1.5 * p1 else "**not met**"
            shown_target = target if (backend == "s3" or not target.startswith("<")) else "flat per 1k"

            def f(x):
                return "—" if x is None else f"{x:.2f} s"
            where = f"s3 ({info['latency_ms']:g} ms)" if backend == "s3" else backend
            lines.append(f"| {where} | {label} | {f(v1)} | {f(v10)} | {f(p1)} | {f(p10)} | {shown_target} | {met} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_results(text: str, path: str) -> None:
    old = open(path).read() if os.path.exists(path) else "# modalmill benchmark results\n"
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + text.strip() + rest.split(END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--backends", default="s3,local")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--json", default=os.path.join(HERE, "_work", "scale.json"))
    ap.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from --json")
    a = ap.parse_args(argv)
    if a.render:
        with open(a.json) as f:
            saved = json.load(f)
        results = {b: {int(n): r for n, r in by_n.items()} for b, by_n in saved["results"].items()}
        write_results(render(results, saved["info"]), a.out)
        return 0
    from benchmarks import common

    common.bench_env()
    sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    t0 = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    work = tempfile.mkdtemp(prefix="modalmill-bench-scale-")
    results: dict = {}
    try:
        template, inp = make_template(work)
        log("template output made")
        if "local" in backends:
            results["local"] = {n: run_local(work, template, inp, n) for n in sizes}
        if "s3" in backends:
            from pathlib import Path

            from tests.fixtures_s3 import FlakyProxy, SeaweedProcess, find_weed

            proc = SeaweedProcess(find_weed(), Path(work) / "seaweed")
            (Path(work) / "seaweed").mkdir()
            server = proc.start()
            proxy = FlakyProxy(server, record=False).start()
            for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "MODALMILL_S3_ENDPOINT"):
                os.environ.pop(k, None)
            try:
                results["s3"] = {n: run_s3(server, proxy, template, inp, n, a.latency_ms / 1000) for n in sizes}
            finally:
                proxy.stop()
                proc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    duration = time.perf_counter() - t0
    m = common.machine()
    args = sys.argv[1:] if argv is None else argv
    info = {"command": " ".join(["python benchmarks/bench_scale.py", *args]),
            "date": date, "duration_s": duration, "latency_ms": a.latency_ms,
            "machine": f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}",
            "commit": common.git_commit(),
            "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    text = render(results, info)
    write_results(text, a.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
