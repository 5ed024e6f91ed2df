"""`modalmill filter`: a new output of the samples that pass --where and --drop-duplicates, every modality rewritten
aligned and resharded; `check` clean; every kept sample traceable; every dropped one listed with its rule; 4M's own
loader reads it; `load_dataset(where=...)` filters the same way on the fly."""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from modalmill.cli import main
from modalmill.io import manifest
from modalmill.io.tars import iter_tar_groups
from modalmill.io.where import WhereError, compile_where
from modalmill.jobs.check import check_output
from modalmill.jobs.democorpus import DESCRIPTIONS, photos, write_shard
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from tests.ml4m import check_captions, needs_ml4m

WHERE = "aesthetic_score >= 5 and watermark_score < 0.5"
MODS = ["rgb", "crop_settings", "caption", "canny_edge", "color_palette", "metadata"]


def _jpeg(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory):
    """A demo-like output (the demo's photos, captions and model-free modalities) whose json members carry COYO's
    score columns; sample 000011 is an exact copy of 000001."""
    d = tmp_path_factory.mktemp("filter")
    pics = photos()
    names = sorted(pics)[:11]
    samples = []
    for i, name in enumerate(names + [names[1]]):
        img = np.asarray(Image.fromarray(pics[name]).resize((120, 96)))
        aes = [6.1, 5.2, 4.0, 7.3, 5.0, 3.1][i % 6]
        wm = [0.1, 0.2, 0.05, 0.8, 0.3, 0.1][i % 6] if i != 11 else 0.2
        if i == 11:
            aes = 5.2  # the copy of sample 1 carries its scores
        samples.append((f"{i:06d}", {"jpg": _jpeg(img), "txt": DESCRIPTIONS.get(name, name).encode(),
                                     "json": json.dumps({"aesthetic_score_laion_v2": aes,
                                                         "watermark_score": wm}).encode()}))
    for s in range(3):
        write_shard(str(d / "corpus" / f"shard-{s:05d}.tar"), samples[4 * s:4 * s + 4])
    out = d / "out"
    job = job_from_dict({"input": str(d / "corpus" / "shard-{00000..00002}.tar"), "output": str(out),
                         "modalities": MODS, "crops": {"n_crops": 2}, "decode": {"max_size": 128},
                         "text": {"caption_source": "input"}})
    assert run_job(job, show_progress=False)["exit_code"] == EXIT_OK
    r = CliRunner().invoke(main, ["dedup", str(out), "--method", "exact", "--name", "ex", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def _meta(out):
    got = {}
    for shard in sorted(manifest.list_markers(str(out))):
        for key, m in iter_tar_groups(os.path.join(out, "metadata", f"{shard}.tar")):
            got[key] = json.loads(m["json"])
    return got


@pytest.fixture(scope="module")
def filtered(scored, tmp_path_factory):
    new = tmp_path_factory.mktemp("filtered") / "new"
    r = CliRunner().invoke(main, ["filter", str(scored), str(new), "--where", WHERE, "--drop-duplicates", "ex",
                                  "--shard-size", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    return new


def test_filtered_output_is_clean_resharded_and_holds_exactly_the_passing_samples(scored, filtered):
    report = check_output(str(filtered))
    assert report.ok, [v.line() for v in report.violations]
    src_meta = _meta(scored)
    where = compile_where(WHERE)
    passing = [k for k, m in src_meta.items() if where(m) and k != "000011"]  # 000011: the copy (keep rule: first)
    new_meta = _meta(filtered)
    assert list(new_meta) == passing and len(passing) >= 3
    markers = manifest.list_markers(str(filtered))
    assert all(mk["n_samples"] <= 2 for mk in markers.values()) and len(markers) == -(-len(passing) // 2)
    assert set(report.modalities) == set(MODS)


def test_every_kept_sample_is_traceable_and_bytes_are_unchanged(scored, filtered):
    kept = pq.read_table(os.path.join(filtered, "_modalmill", "filter", "kept.parquet")).to_pylist()
    for k in kept:
        assert k["source_output"] == str(scored)
        src = dict(iter_tar_groups(os.path.join(scored, "rgb", f"{k['source_shard']}.tar")))[k["source_key"]]
        new = dict(iter_tar_groups(os.path.join(filtered, "rgb", f"{k['shard']}.tar")))[k["key"]]
        assert src == new
        assert k["input_source"].endswith(".tar") and k["input_position"] >= 0
    rows = [r for s in sorted(manifest.list_markers(str(filtered))) for r in manifest.read_rows(str(filtered), s)]
    assert [(r.key, r.source) for r in rows] == [(k["key"], f"{scored}#{k['source_shard']}") for k in kept]


def test_every_dropped_sample_is_listed_with_its_rule(scored, filtered):
    dropped = pq.read_table(os.path.join(filtered, "_modalmill", "filter", "dropped.parquet")).to_pylist()
    kept = pq.read_table(os.path.join(filtered, "_modalmill", "filter", "kept.parquet")).to_pylist()
    src_meta = _meta(scored)
    assert len(dropped) + len(kept) == len(src_meta)
    where = compile_where(WHERE)
    for d in dropped:
        rules = d["rule"].split("; ")
        assert (f"where:{WHERE}" in rules) == (not where(src_meta[d["source_key"]]))
        assert ("dedup:ex" in rules) == (d["source_key"] == "000011")
    summary = json.loads(open(os.path.join(filtered, "_modalmill", "filter", "filter.json")).read())
    assert summary["n_dropped"] == len(dropped) and "keep_rule" in summary["dedup_rules"]["ex"]


def test_load_dataset_where_filters_on_the_fly(scored, filtered):
    from modalmill.dataset.loader import load_dataset

    on_the_fly = [s["__key__"] for s in load_dataset(str(scored), ["rgb", "metadata"], shuffle_shards=False,
                                                      where=WHERE)]
    src_meta = _meta(scored)
    assert on_the_fly == [k for k, m in src_meta.items() if compile_where(WHERE)(m)]
    with pytest.raises(WhereError):
        load_dataset(str(scored), ["rgb"], where="__import__('os').system('true')")


def test_where_parser_refuses_code_and_handles_missing_fields():
    for bad in ("__import__('os')", "x.y > 1", "a[0] > 1", "a + 1 > 2", "lambda: 1", "[x for x in y]", "f(x)"):
        with pytest.raises(WhereError):
            compile_where(bad)
    w = compile_where("4 <= aesthetic_score < 8 and not (watermark_score >= 0.5) or key in ('a', 'b')")
    assert w({"aesthetic_score": 5, "watermark_score": 0.1, "key": "z"})
    assert w({"aesthetic_score": 5, "key": "z"})  # missing watermark_score: the comparison is false, its not true
    assert not w({"aesthetic_score": 9, "watermark_score": 0.1, "key": "z"})
    assert w({"key": "a"})
    assert not compile_where("aesthetic_score >= 5")({"key": "z"})  # a missing field compares false
    assert compile_where("not aesthetic_score >= 5")({"key": "z"})


@needs_ml4m
def test_ml4m_loader_reads_the_filtered_output(filtered):
    report = check_captions(filtered)
    assert report["errors"] == [] and report["samples"] == len(_meta(filtered))
    assert report["crop_rows_read"] == 2 * report["samples"]


def test_stats_shows_the_score_histograms(scored):
    from modalmill.jobs.stats import corpus_stats, format_stats

    st = corpus_stats(str(scored), modalities=["metadata"])
    h = st["modalities"]["metadata"]["histograms"]
    assert sum(h["aesthetic_score"]["counts"]) == 12 and sum(h["watermark_score"]["counts"]) == 12
    assert h["aesthetic_score"]["counts"][12] == 2  # samples 0 and 6: 6.1 falls in [6.0, 6.5)
    text = "\n".join(format_stats(st))
    assert "aesthetic_score histogram (12 value(s))" in text and "#" in text


def test_where_reads_scores_from_metadata_or_their_scalar_modality():
    from modalmill.io.where import needed_modalities

    w = compile_where("aesthetic_score >= 5 and clip_score > 0.2 and brightness < 200")
    assert sorted(needed_modalities(w)) == ["clip_score", "metadata"]
    assert sorted(needed_modalities(w, {"metadata", "clip_score", "aesthetic_score"})) == ["clip_score", "metadata"]
    with pytest.raises(WhereError, match="metadata"):  # brightness lives in metadata only
        needed_modalities(w, {"aesthetic_score", "clip_score"})
    assert needed_modalities(compile_where("aesthetic_score > 5"), {"aesthetic_score"}) == ["aesthetic_score"]


def _upload(client, local, bucket, prefix):
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            client.upload_file(path, bucket, f"{prefix}/" + os.path.relpath(path, local).replace(os.sep, "/"))


@pytest.mark.s3
def test_dedup_and_filter_with_both_outputs_on_s3(scored, filtered, s3_env):
    """`modalmill dedup` and `modalmill filter` on an output in a SeaweedFS bucket, the new output in the bucket
    too (the session's Ray workers were started before the S3 settings: they get them from the driver): the same
    samples kept as locally, `check` clean, the lineage and dropped lists written."""
    server, bucket = s3_env
    client = server.client()
    _upload(client, str(scored), bucket, "out")
    src, new = f"s3://{bucket}/out", f"s3://{bucket}/curated"
    r = CliRunner().invoke(main, ["dedup", src, "--method", "exact", "--name", "ex3", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["filter", src, new, "--where", WHERE, "--drop-duplicates", "ex3",
                                  "--shard-size", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    report = check_output(new)
    assert report.ok, [v.line() for v in report.violations]
    here = {s: manifest.read_marker(str(filtered), s)["keys"] for s in manifest.list_markers(str(filtered))}
    there = {s: m["keys"] for s, m in manifest.list_markers(new).items()}
    assert there == here
    kept = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key="curated/_modalmill/filter/kept.parquet")
                                    ["Body"].read())).to_pylist()
    assert [k["source_output"] for k in kept] == [src] * len(kept)
    dropped = pq.read_table(io.BytesIO(client.get_object(
        Bucket=bucket, Key="curated/_modalmill/filter/dropped.parquet")["Body"].read())).to_pylist()
    assert any(d["rule"].endswith("dedup:ex3") for d in dropped)


def test_filter_holds_the_new_outputs_lease(scored, tmp_path):
    """A second driver holding NEW's lease: the filter is refused (exit 5, the holder named) and writes nothing
    but leaves the lease alone; once it is released the filter runs; a filter into a written NEW is refused; a
    shard task whose lease was taken over commits no tar."""
    from modalmill.io.lease import Lease, LeaseLost
    from modalmill.io.tars import scan_layout
    from modalmill.jobs.filter import FilterConfig, _assign_shards, plan_filter, write_new_shard

    new = tmp_path / "new"
    other = Lease(str(new), command="another filter").acquire()
    try:
        r = CliRunner().invoke(main, ["filter", str(scored), str(new), "--where", WHERE, "--no-progress"])
        assert r.exit_code == 5, r.output
        assert "another filter" in r.output and "--wait" in r.output
        assert sorted(os.listdir(new / "_modalmill")) == ["lease"] and sorted(os.listdir(new)) == ["_modalmill"]
    finally:
        other.release()
    r = CliRunner().invoke(main, ["filter", str(scored), str(new), "--where", WHERE, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert check_output(str(new)).ok
    r = CliRunner().invoke(main, ["filter", str(scored), str(new), "--where", WHERE, "--no-progress"])
    assert r.exit_code == 1 and "already holds files" in r.output

    fenced = tmp_path / "fenced"
    first = Lease(str(fenced)).acquire()
    fence = first.fence()
    first.release()
    taker = Lease(str(fenced)).acquire()  # the next generation: the first holder's fence is stale
    try:
        markers = manifest.list_markers(str(scored))
        layout = scan_layout(str(scored))
        kept, _, _ = plan_filter(str(scored), FilterConfig(), markers, layout)
        part = _assign_shards(kept, 100)[0]
        with pytest.raises(LeaseLost):
            write_new_shard(str(scored), str(fenced), part, {"rgb": layout.folders["rgb"]}, ["rgb"], fence)
        assert not (fenced / "rgb").exists() or not os.listdir(fenced / "rgb")
    finally:
        taker.release()
