"""Corpus-scale bookkeeping gives the same answers as the one-read-per-shard code it replaced.

The reference functions below are the pre-index algorithms, kept verbatim in spirit: planning reads every
selected shard's marker with its own GET, ``status``/``stats`` read every marker and the whole manifest table,
``load_dataset`` reads every marker's key list. On a small output (local and on the loopback S3 server) the new
planner (listing pages + shard index + bounded parallel reads), ``status``, ``stats`` and ``load_dataset`` must
agree with them: after a clean run, after a run that was interrupted (markers newer than the stored index, a
shard killed between its manifest and its marker, a failure record), and after the rerun that completes it.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from modalmill.dataset import load_dataset
from modalmill.io import index, manifest, storage
from modalmill.jobs.democorpus import jpeg_bytes, photos, write_shard
from modalmill.jobs.runner import CORE, FULL, UPDATE, JobError, plan_job, prepare_job, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.jobs.stats import corpus_stats
from modalmill.jobs.status import output_status

MODS = ["rgb", "crop_settings", "canny_edge"]


# ---------------------------------------------------------------------- the reference (one read per shard)


def ref_plan(spec, only=None, force=False):
    """The planning loop before the index: one sequential marker GET per selected shard."""
    job = prepare_job(spec, only, force)
    requested, req_only = job.requested, job.requested_only
    tasks, skipped, problems = [], [], []
    for src in job.selected:
        marker = manifest.read_marker(spec.output, src.name)
        if marker and marker.get("source") != src.url:
            problems.append(src.name)
            continue
        have = marker.get("modalities", {}) if marker else {}
        stale = [m for m in (req_only if only else requested)
                 if m in have and job.expected[m]["config_hash"] not in
                 (have[m].get("config_hash"), (have[m].get("refines") or {}).get("config_hash"))]
        if only:
            if marker and any(m in CORE for m in req_only):
                problems.append("--only")  # the message names the modalities, not the shard
                continue
            if not marker or (stale and not force):
                problems.append(src.name)
                continue
            todo = [m for m in req_only if force or m not in have or m in stale]
            (tasks.append((src.name, UPDATE, tuple(todo))) if todo else skipped.append(src.name))
            continue
        if force or not marker:
            tasks.append((src.name, FULL, tuple(requested)))
        elif stale:
            problems.append(src.name)
        else:
            missing = [m for m in requested if m not in have]
            (tasks.append((src.name, UPDATE, tuple(missing))) if missing else skipped.append(src.name))
    return sorted(tasks), sorted(skipped), sorted(problems)


def new_plan(spec, only=None, force=False):
    try:
        plan = plan_job(spec, only=only, force=force)
    except JobError as e:
        return None, None, sorted(line.split()[0].rstrip(":") for line in str(e).splitlines()[1:])
    return sorted((t.shard, t.mode, t.write) for t in plan.tasks), sorted(plan.skipped), []


def ref_status(root):
    markers = manifest.list_markers(root)
    failures = {k: v for k, v in manifest.list_failures(root).items() if k not in markers}
    runs = sorted(manifest.list_runs(root), key=lambda r: r.get("run_id", ""))
    total = runs[-1]["shards_total"] if runs else None
    rows = manifest.read_manifest(root).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    return {
        "output": root, "shards_total": total, "shards_done": len(markers), "shards_failed": len(failures),
        "shards_pending": None if total is None else max(0, total - len(markers) - len(failures)),
        "samples_read": len(rows), "samples_ok": sum(r["status"] == "ok" for r in rows),
        "samples_failed": len(failed),
        "errors_by_reason": dict(Counter(f"{r['stage']}: {(r['error'] or '').split(':')[0].strip()}" for r in failed)),
        "modalities": dict(Counter(m for mk in markers.values() for m in mk.get("modalities", {}))),
        "failures": {k: v.get("error", "") for k, v in failures.items()}, "runs": len(runs),
    }


def ref_manifest_counts(root):
    rows = manifest.read_manifest(root).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    return {"samples_read": len(rows), "samples_ok": sum(r["status"] == "ok" for r in rows),
            "samples_failed": len(failed),
            "failures_by_reason": dict(Counter(f"{r['stage']}: {(r['error'] or '').split(':')[0].strip()}"
                                               for r in failed).most_common()),
            "failures_by_stage": dict(Counter(r["stage"] for r in failed).most_common())}


def ref_dataset(root, mods):
    """(shard, keys) of every completed shard that has ``mods``, as the loader read them from every marker."""
    return [(name, mk["keys"]) for name, mk in sorted(manifest.list_markers(root).items())
            if all(m in mk["modalities"] for m in mods)]


def assert_same_answers(spec, root, plans):
    for only, force in plans:
        tasks, skipped, problems = ref_plan(spec, only, force)
        got = new_plan(spec, only, force)
        if problems:  # the job refuses, naming the same shards
            assert got == (None, None, problems), (only, force)
        else:
            assert got == (tasks, skipped, []), (only, force)
    assert output_status(root) == ref_status(root)
    st = corpus_stats(root)
    assert {k: st[k] for k in ref_manifest_counts(root)} == ref_manifest_counts(root)
    want = ref_dataset(root, ["rgb", "canny_edge"])
    ds = load_dataset(root, ["rgb", "canny_edge"], shuffle_shards=False, decode=False)
    assert [(s.name, s.n_samples) for s in ds.shards] == [(n, len(k)) for n, k in want]
    assert ds.total_samples == sum(len(k) for _, k in want)
    got = [(s["__shard__"], s["__key__"]) for s in ds]
    assert got == [(n, k) for n, keys in want for k in keys]


# ---------------------------------------------------------------------- the output


def make_corpus(tmp_path, n_shards=5):
    pics = photos()
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for i in range(n_shards):
        samples = [(f"s{i}_{j}", {"jpg": jpeg_bytes(pics[names[(i + j) % 4]][:96, :96])}) for j in range(2)]
        if i == 1:  # a failed sample, so errors_by_reason is not empty
            samples.insert(1, ("bad", {"jpg": jpeg_bytes(pics["chelsea"])[:300]}))
        write_shard(str(tmp_path / "in" / f"shard-{i:05d}.tar"), samples)
    return str(tmp_path / "in" / f"shard-{{00000..{n_shards - 1:05d}}}.tar")


def job(inp, out, **kw):
    return job_from_dict({"input": inp, "output": out, "modalities": MODS, "batch_size": 4,
                          "crops": {"n_crops": 1}, "decode": {"max_size": 96}, **kw})


def interrupted_run(spec, root):
    """What a driver killed mid-run leaves: markers newer than the stored index (an --only run over shards 0-1
    whose index refresh never happened), shard 3 killed between its manifest and its marker (tars and manifest
    written, no marker) with a failure record, and nothing else touched."""
    url = index.index_url(root)
    old_index = storage.read_bytes(url)
    only = job_from_dict({**_spec_dict(spec), "shards": "0-1"})
    run_job(only, only=["color_palette"], show_progress=False)
    storage.write_bytes(url, old_index)  # the killed driver never refreshed the index
    storage.remove(manifest.marker_url(root, "shard-00003"))
    manifest.write_failure(root, "shard-00003", {"shard": "shard-00003", "status": "failed",
                                                 "error": "WorkerDied: killed"})


def _spec_dict(spec):
    return {"input": spec.input, "output": spec.output, "modalities": list(spec.modalities), "batch_size": 4,
            "crops": {"n_crops": 1}, "decode": {"max_size": 96}}


PLANS = [(None, False), (["color_palette"], False), (["canny_edge"], True), (None, True), (["rgb"], False)]


def _scenario(ray_local, inp, root):
    spec = job(inp, root)
    assert run_job(spec, show_progress=False)["planning"]["markers_read"] == 0  # a fresh output: nothing to read
    assert storage.exists(index.index_url(root))  # the run left its index
    assert_same_answers(spec, root, PLANS)
    rerun = run_job(spec, show_progress=False)
    assert rerun["shards_skipped"] == 5 and rerun["planning"]["markers_read"] == 0  # all from the index

    interrupted_run(spec, root)
    snap = index.load_snapshot(root)
    assert "shard-00003" in snap.markers  # the stale index still believes in shard 3 ...
    assert_same_answers(spec, root, PLANS)  # ... and no answer does
    assert output_status(root)["shards_failed"] == 1

    spec2 = job_from_dict({**_spec_dict(spec), "modalities": MODS + ["color_palette"]})
    s = run_job(spec2, show_progress=False)  # the rerun completes it: shard 3 again, color_palette on 2 and 4
    assert s["shards_processed"] == 3 and s["shards_skipped"] == 2
    assert s["planning"]["markers_read"] == 2  # only the markers the interrupted run rewrote
    assert_same_answers(spec2, root, PLANS)
    assert output_status(root)["shards_failed"] == 0 and output_status(root)["shards_done"] == 5
    snap = index.load_snapshot(root)
    assert sorted(snap.markers) == [f"shard-{i:05d}" for i in range(5)]
    assert all("color_palette" in m.modalities for m in snap.markers.values())


def test_local_same_answers_clean_and_after_an_interrupted_run(ray_local, tmp_path):
    _scenario(ray_local, make_corpus(tmp_path), str(tmp_path / "out"))


@pytest.mark.s3
def test_s3_same_answers_clean_and_after_an_interrupted_run(ray_local, s3_env, tmp_path):
    _server, bucket = s3_env
    _scenario(ray_local, make_corpus(tmp_path), f"s3://{bucket}/out")


def test_a_corrupt_or_foreign_index_is_only_a_cache(ray_local, tmp_path):
    root = str(tmp_path / "out")
    spec = job(make_corpus(tmp_path, n_shards=3), root)
    run_job(spec, show_progress=False)
    want = ref_status(root)
    storage.write_bytes(index.index_url(root), b"not parquet")
    assert output_status(root) == want
    assert run_job(spec, show_progress=False)["planning"]["markers_read"] == 3  # rebuilt ...
    assert run_job(spec, show_progress=False)["planning"]["markers_read"] == 0  # ... once
    # a marker rewritten in place with other content is re-read, whatever the index says
    mk = manifest.read_marker(root, "shard-00001")
    mk["modalities"]["canny_edge"]["config_hash"] = "0" * 16
    manifest.write_marker(root, "shard-00001", mk)
    with pytest.raises(JobError, match=r"shard-00001: \['canny_edge'\] were made with other settings"):
        run_job(spec, show_progress=False)


def test_listing_pages_and_bounded_reads(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(25):
        (d / f"f{i:03d}.json").write_text(json.dumps(i))
    (d / ".f999.json.tmp-" "0123456789abcdef0123456789abcdef").write_text("x")
    pages = list(storage.list_pages(str(d), suffix=".json", page_size=10))
    assert [len(p) for p in pages] == [10, 10, 5]
    urls = [u for p in pages for u, _ in p]
    assert urls == sorted(urls) and len(set(v for p in pages for _, v in p)) == 25
    got = list(storage.read_many(urls + [str(d / "missing.json")], workers=3))
    assert [json.loads(b) for _, b in got[:-1]] == list(range(25)) and got[-1][1] is None
    before = dict(pages[0])[str(d / "f000.json")]
    storage.write_bytes(str(d / "f000.json"), b"0")  # same content, rewritten: a new version
    assert dict(next(storage.list_pages(str(d), suffix=".json")))[str(d / "f000.json")] != before


def test_planning_streams_tasks_before_the_listing_ends(tmp_path, monkeypatch):
    """With 1-key listing pages, the first page's decisions come before the later pages are listed."""
    from modalmill.jobs import runner

    root = tmp_path / "out"
    for i in range(12):
        manifest.write_marker(str(root), f"shard-{i:05d}", {"source": "elsewhere"})
    inp = make_corpus(tmp_path, n_shards=5)
    listed = []
    real = storage.list_pages

    def small_pages(prefix, suffix="", page_size=1000):
        for page in real(prefix, suffix, page_size=1):
            listed.append(page[0][0])
            yield page

    monkeypatch.setattr(storage, "list_pages", small_pages)
    pages = runner.plan_pages(prepare_job(job(inp, str(root))))
    first = next(pages)
    assert len(first.problems) == 1 and first.problems[0].startswith("shard-00000 was made from 'elsewhere'")
    assert len(listed) <= 1 + 4 + 1 < 12  # the listing runs a few pages ahead (prefetch), not to the end
    rest = list(pages)
    assert len(listed) == 12 and sum(len(p.problems) for p in rest) == 4 and not any(p.tasks for p in rest)


def _manifest_checks(root, dest):
    want = manifest.read_manifest(root)
    assert want.num_rows == 7 and want.column("status").to_pylist().count("failed") == 1
    assert manifest.export_manifest(root, dest) == want.num_rows
    import pyarrow.parquet as pq

    with storage.open_read(dest) as f:
        assert pq.read_table(f, use_threads=False).to_pylist() == want.to_pylist()
    ds = manifest.manifest_dataset(root)
    got = ds.to_table(use_threads=False)
    assert sorted(got.to_pylist(), key=lambda r: (r["shard"], r["position"])) == \
        sorted(want.to_pylist(), key=lambda r: (r["shard"], r["position"]))
    import pyarrow.compute as pc

    failed = ds.to_table(columns=["key", "stage"], filter=pc.field("status") == "failed", use_threads=False)
    assert failed.to_pylist() == [{"key": "bad", "stage": "decode"}]
    streamed = list(manifest.iter_manifest(root, columns=["key"]))
    assert len(streamed) == 3 and sum(t.num_rows for t in streamed) == 7


def test_whole_manifest_as_one_dataset_local(ray_local, tmp_path):
    root = str(tmp_path / "out")
    run_job(job(make_corpus(tmp_path, n_shards=3), root), show_progress=False)
    _manifest_checks(root, str(tmp_path / "all.parquet"))


@pytest.mark.s3
def test_whole_manifest_as_one_dataset_s3(ray_local, s3_env, tmp_path):
    _server, bucket = s3_env
    root = f"s3://{bucket}/out"
    run_job(job(make_corpus(tmp_path, n_shards=3), root), show_progress=False)
    _manifest_checks(root, f"s3://{bucket}/exports/manifest.parquet")


def test_a_long_run_record_keeps_its_shard_list_beside_it(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(manifest, "RUN_SHARDS_INLINE", 2)
    shards = [{"shard": f"shard-{i:05d}", "mode": "full", "n_read": 2, "n_ok": 2, "n_failed": 0,
               "seconds": {"total": 0.5}} for i in range(5)]
    manifest.write_run(str(tmp_path), "20260101T000000Z-abc", {"run_id": "20260101T000000Z-abc", "shards": shards})
    (rec,) = manifest.list_runs(str(tmp_path))
    assert rec["shards"] == shards[:2] and rec["shards_file"] == "20260101T000000Z-abc.shards.parquet"
    table = pq.read_table(tmp_path / "_modalmill" / "runs" / rec["shards_file"])
    assert table.column("shard").to_pylist() == [s["shard"] for s in shards]


def test_tasks_start_while_later_pages_are_planned_and_new_pools_come_after(ray_local, tmp_path, monkeypatch):
    """A real run over 1-marker listing pages that are slow to list: the first task is handed to Ray before the
    marker listing is done. Shards 2-3 need a model labeler (an actor pool) that the first page's task did not:
    they run after the stream, with their own pool, and every shard ends up complete."""
    import time

    import tests.labelers_for_tests  # noqa: F401  (registers test_where_prepared, a stateful labeler)

    root = str(tmp_path / "out")
    inp = make_corpus(tmp_path, n_shards=4)
    base = _spec_dict(job(inp, root))
    run_job(job(inp, root), show_progress=False)
    with_caption = {**base, "modalities": MODS + ["caption"], "labelers": {"test_where_prepared": {}}}
    run_job(job_from_dict({**with_caption, "shards": "0-1"}), show_progress=False)  # captions on shards 0-1
    spec = job_from_dict({**with_caption, "modalities": MODS + ["caption", "color_palette"]})

    listed, at_first_submit, submitted = [], [], []
    real = storage.list_pages

    def slow_pages(prefix, suffix="", page_size=1000):
        for page in real(prefix, suffix, page_size=1):
            if prefix.rstrip("/").endswith("shards"):
                time.sleep(0.5)
                listed.append(page[0][0])
            yield page

    monkeypatch.setattr(storage, "list_pages", slow_pages)

    def on_submit(task):
        if not at_first_submit:
            at_first_submit.append(len(listed))
        submitted.append((task.shard, task.write))

    s = run_job(spec, show_progress=False, on_submit=on_submit)
    assert s["shards_processed"] == 4 and s["exit_code"] in (0, 3)
    assert at_first_submit[0] < 4  # the first task ran before the last marker was listed
    assert s["planning"]["deferred"] == 2  # shards 2-3 waited for the caption labeler's pool
    assert sorted(submitted) == [("shard-00000", ("color_palette",)), ("shard-00001", ("color_palette",)),
                                 ("shard-00002", ("caption", "color_palette")),
                                 ("shard-00003", ("caption", "color_palette"))]
    markers = manifest.list_markers(root)
    assert all({"caption", "color_palette"} <= set(m["modalities"]) for m in markers.values())
    assert all(m["modalities"]["caption"]["labeler"] == "test_where_prepared" for m in markers.values())
