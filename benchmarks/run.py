"""Run every benchmark and write benchmarks/RESULTS.md (``make bench``).

    python benchmarks/run.py            # the full suite (budget 15 minutes on 2 cores; last run 40 min: over)
    python benchmarks/run.py --quick    # a smoke run for development: 400 images, one repetition each
                                        # (writes benchmarks/_work/RESULTS-quick.md unless --out is given)
    python benchmarks/run.py --only 1,3 # some benchmarks (1, 2 and 4 always run together)

Benchmarks: 1, 2, 4 model-free pipeline vs a plain loop and a Ray Data script, and memory (bench_modelfree);
3 the model path vs the bare model (bench_model); 5 a real GPU (bench_gpu; "not measured" without one);
6 a simulated accelerator that any CPU machine can run (bench_device); 7 semantic dedup of 100k and 1M synthetic
768-d embeddings: time, peak memory, growth for 10x the data (bench_dedup); 8 pools that size themselves: four
models of a 4M-21-like mix on four simulated devices, `workers: auto` against the equal split, and `plan`'s
projection (bench_autoscale).

RESULTS.md is written from a committed tree: its header names the commit. With uncommitted changes to tracked files
the full suite refuses to run (``--allow-dirty`` runs it anyway and the header then says "uncommitted changes" in
bold, naming the files); ``--quick`` warns. The header also records the CPU model (name, family / model / stepping,
clock, SHA-NI / AVX extensions) and the minutes each benchmark took (the whole suite's budget: 15 minutes on 2 cores).

Every figure is a ratio of runs made one after another in this one invocation, with its target and whether it is
met. Each timed phase also records how much CPU other processes used meanwhile; a figure taken while they used
a noticeable share of the machine says so in its note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK_ENV = {"MODALMILL_BENCH_SHARDS": "4", "MODALMILL_BENCH_MODEL_IMAGES": "64",
             "MODALMILL_BENCH_MODEL_PER_SHARD": "32", "MODALMILL_BENCH_REPEATS": "1",
             "MODALMILL_BENCH_DEVICE_SHARDS": "1", "MODALMILL_BENCH_DEVICE_SWEEP": "20,320",
             "MODALMILL_BENCH_AUTOSCALE_SHARDS": "2",
             "MODALMILL_BENCH_QUICK": "1"}
BUDGET_S = 15 * 60
ALL = "1,2,3,4,5,6,7,8"


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _met(f) -> str:
    if f.met is None:
        return "not measured" if f.value is None else ("—" if not f.target else "n/a")
    return "**met**" if f.met else "**NOT met**"


def render(figs, info: dict) -> str:
    m, v = info["machine"], info["versions"]
    head, dirty = info["commit"]
    lines = [
        "# modalmill benchmark results",
        "",
        f"Written by `{info['command']}` on {info['date']} from commit `{head}` in {info['duration_s'] / 60:.1f} "
        f"minutes" + (" (**quick mode: a development smoke run, not the reported figures**)" if info["quick"] else "")
        + (f" **with uncommitted changes** ({dirty})" if dirty else " (a clean tree)") + ".",
        "",
        "- Minutes per benchmark: " + ", ".join(f"{k.split('.')[-1]} {v / 60:.1f}" for k, v in info["minutes"].items())
        + f" (budget: {BUDGET_S / 60:.0f} minutes on 2 cores for the whole suite)",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"load average {info['load_before']} before, {info['load_after']} after",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Corpus: {info['corpus']}",
        "",
        "Every ratio compares runs made one after another in this invocation. \"other processes\" in a note: other",
        "users of this shared machine used that many cores on average during a timed phase (the figure is then",
        "less reliable; rerun on a quiet machine).",
        "",
    ]
    lines += ["## Summary", "", "| benchmark | figure | value | target | met |", "|---|---|---|---|---|",
              *summary_rows(figs), ""]
    current = None
    for f in figs:
        if f.benchmark != current:
            current = f.benchmark
            lines += ["", f"## {current}", "", "| figure | value | target | met | note |", "|---|---|---|---|---|"]
        note = f.note.replace("|", "/")
        lines.append(f"| {f.name} | {_fmt(f.value)} {f.unit if f.value is not None else ''} | {f.target or '—'} | "
                     f"{_met(f)} | {note} |")
    lines += ["", "## How each figure is made", ""]
    for mod in info["modules"]:
        doc = (sys.modules[mod].__doc__ or "").strip()
        lines += [f"### `{mod}`", "", "```", doc, "```", ""]
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- bench-figures: start (written by benchmarks/run.py) -->", "<!-- bench-figures: end -->")


def summary_rows(figs) -> list[str]:
    """The figures with a target, as the rows of RESULTS.md's summary table (the README shows the same rows)."""
    return [f"| {f.benchmark} | {f.name} | {_fmt(f.value)} {f.unit if f.value is not None else ''} | {f.target} | "
            f"{_met(f)} |" for f in figs if f.target]


def readme_block(figs, info: dict) -> str:
    m = info["machine"]
    return "\n".join([
        README_MARKERS[0],
        f"The last `make bench` ({info['date']}, {m['cpu']}, {m['cores']} cores, "
        f"{info['duration_s'] / 60:.1f} minutes; every figure with its min and max, and how each is made, in",
        "[benchmarks/RESULTS.md](benchmarks/RESULTS.md)):",
        "",
        "| benchmark | figure | value | target | met |", "|---|---|---|---|---|", *summary_rows(figs),
        README_MARKERS[1]])


def update_readme(path: str, block: str) -> bool:
    """Replace the README's figures block with ``block``; False when the README has no such block."""
    text = open(path).read()
    a, b = README_MARKERS
    if a not in text or b not in text:
        return False
    head, rest = text.split(a, 1)
    tail = rest.split(b, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(head + block + tail)
    os.replace(path + ".tmp", path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for development")
    ap.add_argument("--only", default=ALL, help="benchmarks to run (1, 2 and 4 run together)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run the full suite from a tree with uncommitted changes (RESULTS.md says so)")
    ap.add_argument("--out", default=None, help="where to write the results (default benchmarks/RESULTS.md; "
                                                "--quick: benchmarks/_work/RESULTS-quick.md)")
    a = ap.parse_args(argv)
    if a.quick:
        for k, val in QUICK_ENV.items():
            os.environ.setdefault(k, val)
    sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks import common  # after the quick settings: it reads them when imported

    head, dirty = common.git_state()
    if dirty:
        if not (a.quick or a.allow_dirty):
            print(f"refusing to run: uncommitted changes ({dirty}); RESULTS.md is written from a committed tree: "
                  "commit first (or pass --allow-dirty, and RESULTS.md says so)", file=sys.stderr)
            return 2
        print(f"WARNING: uncommitted changes ({dirty}): the results will say so; commit and rerun for figures to "
              "report", file=sys.stderr)
    common.bench_env()
    from benchmarks import bench_autoscale, bench_dedup, bench_device, bench_gpu, bench_model, bench_modelfree

    only = {int(x) for x in a.only.split(",") if x.strip()}
    out = a.out or (os.path.join(common.WORK, "RESULTS-quick.md") if a.quick else os.path.join(HERE, "RESULTS.md"))
    t0 = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    paths = common.ensure_corpus(log)
    figs = []
    modules = []
    minutes: dict[str, float] = {}
    for nums, mod in (({1, 2, 4}, bench_modelfree), ({3}, bench_model), ({5}, bench_gpu), ({6}, bench_device),
                      ({7}, bench_dedup), ({8}, bench_autoscale)):
        if not nums & only:
            continue
        modules.append(mod.__name__)
        t_mod = time.perf_counter()
        try:
            figs += mod.run(log=log)
        except Exception as e:  # noqa: BLE001 - one benchmark's failure must not hide the others' figures
            log(f"{mod.__name__} failed: {e}")
            figs.append(common.not_measured(mod.__name__, "all figures", f"{type(e).__name__}: {e}"[:400]))
        minutes[mod.__name__] = time.perf_counter() - t_mod
    duration = time.perf_counter() - t0
    lo, hi = common.CORPUS_SIZE_RANGE
    info = {
        "command": "python benchmarks/run.py" + (" --quick" if a.quick else "") +
                   (f" --only {a.only}" if a.only != ALL else ""),
        "date": date, "duration_s": duration, "quick": a.quick, "machine": common.machine(),
        "versions": common.versions((head, dirty)), "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "corpus": f"{common.count_images(paths)} JPEGs ({lo}-{hi} px longer side, derived from scikit-image's "
                  f"photos by modalmill.jobs.democorpus.build_corpus) in {len(paths)} tar shards",
        "modules": modules, "commit": (head, dirty), "minutes": minutes,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    text = render(figs, info)
    keep = "<!-- bench-scale: start -->", "<!-- bench-scale: end -->"  # `make bench-scale`'s own section stays
    old = open(out).read() if os.path.exists(out) else ""
    if keep[0] in old and keep[1] in old:
        text = text.rstrip() + "\n\n" + keep[0] + old.split(keep[0], 1)[1].split(keep[1], 1)[0] + keep[1] + "\n"
    with open(out, "w") as f:
        f.write(text)
    readme = os.path.join(os.path.dirname(HERE), "README.md")
    if out == os.path.join(HERE, "RESULTS.md") and not a.quick and a.only == ALL:
        if update_readme(readme, readme_block(figs, info)):
            log("updated the README's figures table")
    with open(os.path.join(common.WORK, "results.json"), "w") as f:
        json.dump({"info": info, "figures": [x.as_dict() for x in figs]}, f, indent=1)
    log(f"wrote {out} ({duration / 60:.1f} minutes)")
    for x in figs:
        if x.target:
            print(f"  {x.benchmark} | {x.name}: {_fmt(x.value)} {x.unit} (target {x.target}: {_met(x)})")
    if duration > BUDGET_S and not a.quick:
        print(f"warning: the suite took {duration / 60:.1f} minutes, over the {BUDGET_S / 60:.0f}-minute budget",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
