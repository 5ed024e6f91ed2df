"""What the corpus already has: alt-text captions, source metadata and parquet corpora (issue 16), and captions
stored the way 4M's trainer indexes them by crop row (issue 11).

Real tar shards laid out as img2dataset writes them, real parquet files written with pyarrow (several row groups),
real photos, the real pipeline on an embedded Ray.
"""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tests.labelers_for_tests  # noqa: F401  (registers the test labelers)
from modalmill.cli import main
from modalmill.io import manifest
from modalmill.io.readers import ParquetColumns, iter_samples, plan_sources
from modalmill.io.captions import TextConfig, TextError, input_text, normalise
from modalmill.jobs.check import check_output, per_crop_problem
from modalmill.jobs.democorpus import DESCRIPTIONS, jpeg_bytes, photos, variant, write_shard
from modalmill.jobs.runner import EXIT_OK, EXIT_SAMPLES_FAILED, run_job
from modalmill.jobs.spec import JobSpecError, job_from_dict
from modalmill.schemas.modalities import RecordError, captions_for_crops
from tests.ml4m import check_captions, needs_ml4m

N_CROPS = 3


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def captions(out, shard="shard-00000") -> dict[str, list]:
    return {name.split(".")[0]: json.loads(data) for name, data in tar_members(out / "caption" / f"{shard}.tar")}


def rows(out) -> dict[str, dict]:
    return {r["key"]: r for r in manifest.read_manifest(str(out)).to_pylist()}


def fourm_caption(val, rand_aug_idx):
    """What ml-4m's ``CaptionTransform(aligned_captions=True).image_augment`` does with a stored caption for the crop
    row its augmenter picked (fourm/data/modality_transforms.py); the real class is run by
    ``test_ml4m_caption_transform_reads_every_crop_row`` where ml-4m is available."""
    if isinstance(val, (list, tuple)):
        val = val[0] if rand_aug_idx is None else val[rand_aug_idx]
    if isinstance(val, dict):
        val = val["caption"]
    assert isinstance(val, str)
    return val


# ---------------------------------------------------------------------------------------------- the corpus

LONG = ("A very long alt text that keeps going " * 120).strip()  # ~4500 characters: stored whole, never cut


@pytest.fixture(scope="module")
def img2dataset_shard(tmp_path_factory):
    """One img2dataset-style shard: jpg + txt + json, with a sample without text, one with invalid UTF-8 text, one
    with malformed JSON, one whose text is only in its json, and one very long text."""
    pics = photos()
    d = tmp_path_factory.mktemp("img2dataset")

    def jpg(name, i=0):
        return jpeg_bytes(variant(pics[name], i, (90, 130)))

    def meta(key, **kw):
        return json.dumps({"key": key, "url": f"https://example.org/{key}.jpg", "status": "success",
                           "original_width": 640, "original_height": 480, "similarity": 0.31, **kw}).encode()

    samples = [
        ("000000", {"jpg": jpg("chelsea"), "txt": "  A tabby cat,\n\tgreen   eyes \u00e9t\u00e9 ".encode(),
                    "json": meta("000000", caption="ignored: the .txt comes first")}),
        ("000001", {"jpg": jpg("coffee"), "json": meta("000001")}),  # no text anywhere
        ("000002", {"jpg": jpg("rocket"), "txt": b"caf\xe9 au lait", "json": meta("000002")}),  # Latin-1, not UTF-8
        ("000003", {"jpg": jpg("astronaut"), "txt": DESCRIPTIONS["astronaut"].encode(), "json": b'{"url": "http://x'}),
        ("000004", {"jpg": jpg("coins"), "json": meta("000004", caption="Old coins\nin rows")}),  # text in the json
        ("000005", {"jpg": jpg("moon"), "txt": ("\ufeff" + LONG).encode(), "json": meta("000005")}),  # BOM + long
    ]
    path = d / "shard-00000.tar"
    write_shard(str(path), samples)
    return str(path), dict(samples)


WANT = {"000000": "A tabby cat, green eyes \u00e9t\u00e9", "000003": DESCRIPTIONS["astronaut"],
        "000004": "Old coins in rows", "000005": LONG}


def job(inp, out, **kw):
    data = {"input": inp, "output": str(out), "modalities": ["rgb", "crop_settings", "caption"],
            "crops": {"n_crops": N_CROPS}, "batch_size": 4, "decode": {"max_size": 128}, **kw}
    return job_from_dict(data)


# ---------------------------------------------------------------------------------------------- units


def test_text_is_strict_utf8_normalised_and_never_cut():
    cfg = TextConfig()
    assert input_text({"txt": b" a\u2003b\r\n c ".replace(b"\\u2003", "\u2003".encode())}, cfg)[0] == "a b c"
    assert input_text({"txt": LONG.encode()}, cfg)[0] == LONG
    with pytest.raises(TextError, match=r"\.txt is not valid UTF-8: byte 3 \(e9\)"):
        input_text({"txt": b"caf\xe9"}, cfg)
    assert input_text({"txt": b"  \n "}, cfg)[0] is None  # only whitespace: no text
    assert input_text({"json": b'{"caption": " x  y "}'}, cfg) == ("x y", ".json['caption']")
    assert input_text({"json": b'{"caption": " x "}'}, TextConfig(json_key=None))[0] is None
    assert input_text({"alt": b"from alt"}, TextConfig(member="alt")) == ("from alt", ".alt")
    with pytest.raises(TextError, match="is a int, not a string"):
        input_text({"json": b'{"caption": 3}'}, cfg)
    text, why = input_text({"json": b"{oops"}, cfg)
    assert text is None and "unreadable" in why and "malformed" in why
    assert normalise("a\u00a0b\u3000c") == "a b c"  # Unicode whitespace too
    with pytest.raises(ValueError, match="caption_source"):
        TextConfig(caption_source="alt")


def test_captions_are_one_entry_per_crop_row_and_survive_4m_indexing():
    for n in (1, 2, 4):
        for value in ("a cat", ["a cat"], [{"caption": "a cat"}]):
            stored = captions_for_crops(value, n)
            assert len(stored) == n
            assert [fourm_caption(stored, i) for i in range(n)] == ["a cat"] * n
            assert fourm_caption(stored, None) == "a cat"  # no crop settings: entry 0
    per_crop = ["crop 0", "crop 1", "crop 2"]
    assert captions_for_crops(per_crop, 3) == per_crop  # already one per row: kept
    with pytest.raises(RecordError, match="2 captions for 3 crop_settings rows"):
        captions_for_crops(["a", "b"], 3)
    with pytest.raises(RecordError, match="empty caption list"):
        captions_for_crops([], 3)
    # check's view of what 4M can index
    assert per_crop_problem("caption", ["one"], 4) and "IndexError" in per_crop_problem("caption", ["one"], 4)
    assert per_crop_problem("caption", "one string works with any crop", 4) is None
    assert per_crop_problem("caption", ["a"] * 4, 4) is None
    emb = {"emb": np.zeros((2, 5, 8), np.float16), "mask_valid": np.ones((2, 5), bool)}
    assert "IndexError" in per_crop_problem("t5_caption", emb, 4)
    assert per_crop_problem("t5_caption", {**emb, "emb": emb["emb"][:1]}, 4) is None  # one sequence: any crop


def test_caption_source_default_and_validation():
    base = {"input": "x-{0..1}.tar", "output": "o", "modalities": ["rgb", "caption"]}
    assert job_from_dict(base).text.caption_source == "input"
    # a job that configures a labeler writing captions means the model
    assert job_from_dict({**base, "labelers": {"test_caption_or_fail": {}}}).text.caption_source == "model"
    assert job_from_dict({**base, "labelers": {"test_caption_or_fail": {}},
                          "text": {"caption_source": "input_or_model"}}).text.caption_source == "input_or_model"
    with pytest.raises(JobSpecError, match="caption_source must be one of"):
        job_from_dict({**base, "text": {"caption_source": "alt-text"}})
    with pytest.raises(JobSpecError, match="unknown key 'jsonkey'"):
        job_from_dict({**base, "text": {"jsonkey": "x"}})


# ---------------------------------------------------------------------------------------------- img2dataset shard


def test_img2dataset_shard_captions_from_its_text(ray_local, img2dataset_shard, tmp_path):
    path, samples = img2dataset_shard
    out = tmp_path / "out"
    s = run_job(job(path, out), show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_written"] == 4 and s["samples_failed"] == 2

    caps = captions(out)
    assert sorted(caps) == sorted(WANT)
    crops = {n.split(".")[0]: np.load(io.BytesIO(b)) for n, b in tar_members(out / "crop_settings" / "shard-00000.tar")}
    for key, stored in caps.items():
        assert len(stored) == len(crops[key]) == N_CROPS  # one entry per crop_settings row
        assert [fourm_caption(stored, i) for i in range(N_CROPS)] == [WANT[key]] * N_CROPS
    assert len(caps["000005"][0]) == len(LONG)  # never truncated

    r = rows(out)
    assert r["000001"]["status"] == "failed" and r["000001"]["stage"] == "read"
    assert "caption_source is 'input' but the sample has no text" in r["000001"]["error"]
    assert r["000002"]["status"] == "failed" and r["000002"]["stage"] == "read"
    assert r["000002"]["error"] == ("caption text: .txt is not valid UTF-8: byte 3 (e9 20 61 75): "
                                    "invalid continuation byte")
    for key in WANT:
        assert r[key]["status"] == "ok" and r[key]["caption_source"] == "input"
        assert {p["modality"]: p["labeler"] for p in r[key]["producers"]}["caption"] == "modalmill.input_text"
    # source metadata: the json fields of every sample (failed ones too), malformed json recorded, not fatal
    for key in ("000000", "000001", "000002", "000004", "000005"):
        assert json.loads(r[key]["source_json"]) == json.loads(samples[key]["json"])
        assert r[key]["source_url"] == f"https://example.org/{key}.jpg" and r[key]["source_json_error"] is None
    assert r["000003"]["status"] == "ok" and r["000003"]["source_json"] is None
    assert r["000003"]["source_json_error"].startswith(".json is malformed: Unterminated string")
    assert check_output(str(out)).ok


def test_input_or_model_asks_the_model_only_for_samples_without_text(ray_local, img2dataset_shard, tmp_path):
    path, _ = img2dataset_shard
    out = tmp_path / "out"
    s = run_job(job(path, out, labelers={"test_caption_or_fail": {}}, text={"caption_source": "input_or_model"}),
                show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_failed"] == 1  # only the invalid UTF-8 one
    caps, r = captions(out), rows(out)
    assert caps["000001"] == ["sample 000001"] * N_CROPS  # the test captioner's caption, one per crop row
    assert r["000001"]["caption_source"] == "model"
    prod = {k: {p["modality"]: p["labeler"] for p in r[k]["producers"]}["caption"] for k in caps}
    assert prod["000001"] == "test_caption_or_fail" and prod["000000"] == "modalmill.input_text"
    assert all(caps[k] == [WANT[k]] * N_CROPS and r[k]["caption_source"] == "input" for k in WANT)
    assert r["000002"]["stage"] == "read" and "not valid UTF-8" in r["000002"]["error"]
    marker = manifest.read_marker(str(out), "shard-00000")
    assert marker["modalities"]["caption"]["labeler"] == "modalmill.input_text+test_caption_or_fail"
    assert check_output(str(out)).ok
    # the model alone: the input's text is ignored (and its bad bytes do not matter)
    s = run_job(job(path, tmp_path / "model", labelers={"test_caption_or_fail": {}}), show_progress=False)
    assert s["exit_code"] == EXIT_OK
    assert captions(tmp_path / "model") == {k: [f"sample {k}"] * N_CROPS for k in
                                            ("000000", "000001", "000002", "000003", "000004", "000005")}
    # changing the caption source makes the stored captions stale: an error until --force
    with pytest.raises(Exception, match="other settings"):
        run_job(job(path, tmp_path / "model"), show_progress=False)


def test_only_caption_reads_the_input_text_again(ray_local, img2dataset_shard, tmp_path):
    path, _ = img2dataset_shard
    out = tmp_path / "out"
    assert run_job(job(path, out, modalities=["rgb", "crop_settings"]), show_progress=False)["exit_code"] == EXIT_OK
    s = run_job(job(path, out), only=["caption"], show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_dropped"] == 2
    full = tmp_path / "full"
    run_job(job(path, full), show_progress=False)
    for m in ("rgb", "crop_settings", "caption"):  # the same as making everything in one run
        assert (out / m / "shard-00000.tar").read_bytes() == (full / m / "shard-00000.tar").read_bytes()
    r = rows(out)
    assert {k: r[k]["caption_source"] for k in WANT} == {k: "input" for k in WANT}
    assert "no text" in r["000001"]["error"] and "UTF-8" in r["000002"]["error"]


def test_check_flags_caption_lists_4m_cannot_index(ray_local, img2dataset_shard, tmp_path):
    path, _ = img2dataset_shard
    out = tmp_path / "out"
    run_job(job(path, out), show_progress=False)
    tar = out / "caption" / "shard-00000.tar"
    members = tar_members(tar)
    with tarfile.open(tar, "w") as t:  # what modalmill wrote before: a one-entry list for 3 crops
        for name, data in members:
            if name.startswith("000000."):
                data = json.dumps(json.loads(data)[:1]).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    lines = [v.line() for v in check_output(str(out)).violations]
    assert any(line.startswith("caption shard-00000 000000: 1 caption entries but crop_settings has 3 crops")
               and "IndexError" in line for line in lines), lines


def test_the_user_story_label_an_img2dataset_shard_without_a_captioner(ray_local, img2dataset_shard, tmp_path):
    """`modalmill label shard.tar out -m rgb,crop_settings,caption` uses the .txt (no BLIP weights asked for)."""
    path, _ = img2dataset_shard
    r = CliRunner().invoke(main, ["label", path, str(tmp_path / "out"), "-m", "rgb,crop_settings,caption",
                                  "--n-crops", "2", "--max-size", "128", "--no-progress"])
    assert r.exit_code == EXIT_SAMPLES_FAILED, r.output
    assert "4 sample(s) written, 2 failed" in r.output and "read: caption text" in r.output
    assert captions(tmp_path / "out")["000004"] == ["Old coins in rows"] * 2


# ---------------------------------------------------------------------------------------------- parquet


def _corpus(n=6):
    pics = photos()
    names = ["chelsea", "coffee", "rocket", "astronaut", "coins", "moon"][:n]
    items = []
    for i, name in enumerate(names):
        key = f"s{i:03d}"
        text = None if i == 4 else DESCRIPTIONS[name]  # one sample without text: an error row in both
        items.append((key, jpeg_bytes(variant(pics[name], i, (90, 130))), text, f"https://example.org/{name}.jpg"))
    return items


def _write_parquet(path, items, hf_struct: bool, row_group_size: int):
    image = ([{"bytes": b, "path": f"{k}.jpg"} for k, b, _, _ in items] if hf_struct else [b for _, b, _, _ in items])
    table = pa.table({"key": [k for k, *_ in items], "image": image, "caption": [t for _, _, t, _ in items],
                      "url": [u for *_, u in items]})
    pq.write_table(table, path, row_group_size=row_group_size)
    assert pq.ParquetFile(path).metadata.num_row_groups > 1


@pytest.fixture(scope="module")
def same_corpus_two_ways(tmp_path_factory):
    """The same six images and texts as two tar shards (img2dataset layout) and as two parquet files (row groups
    of 2 rows; the first file stores plain bytes, the second Hugging Face's {bytes, path} image struct)."""
    d = tmp_path_factory.mktemp("two_ways")
    items = _corpus()
    for s, part in enumerate((items[:3], items[3:])):
        samples = []
        for key, jpg, text, url in part:
            members = {"jpg": jpg}
            if text is not None:
                members["txt"] = text.encode()
            members["json"] = json.dumps({"caption": text, "key": key, "url": url}).encode()
            samples.append((key, members))
        write_shard(str(d / "tar" / f"shard-{s:05d}.tar"), samples)
        os.makedirs(d / "pq", exist_ok=True)
        _write_parquet(str(d / "pq" / f"train-{s:05d}-of-00002.parquet"), part, hf_struct=s == 1, row_group_size=2)
    return d


def test_parquet_corpus_gives_the_same_output_as_the_tar_corpus_and_resumes(ray_local, same_corpus_two_ways,
                                                                              tmp_path):
    d = same_corpus_two_ways
    mods = ["rgb", "crop_settings", "caption", "canny_edge"]
    tar_out, pq_out = tmp_path / "tar_out", tmp_path / "pq_out"
    s1 = run_job(job(str(d / "tar" / "shard-{00000..00001}.tar"), tar_out, modalities=mods), show_progress=False)
    pq_job = job(str(d / "pq" / "train-*.parquet"), pq_out, modalities=mods, shard_size=3,
                 parquet={"image_column": "image", "text_column": "caption", "id_column": "key"})
    s2 = run_job(pq_job, show_progress=False)
    assert s1["exit_code"] == s2["exit_code"] == EXIT_SAMPLES_FAILED  # the sample without text, in both
    assert s1["samples_written"] == s2["samples_written"] == 5
    for shard in ("shard-00000", "shard-00001"):
        for m in mods:
            assert (tar_out / m / f"{shard}.tar").read_bytes() == (pq_out / m / f"{shard}.tar").read_bytes(), (shard, m)
        assert manifest.read_marker(str(pq_out), shard)["keys"] == manifest.read_marker(str(tar_out), shard)["keys"]

    def comparable(out):
        return {k: {c: v for c, v in r.items() if c != "source"} for k, r in rows(out).items()}

    assert comparable(pq_out) == comparable(tar_out)  # status, errors, source json, caption source, producers
    assert rows(pq_out)["s004"]["stage"] == "read" and "no text" in rows(pq_out)["s004"]["error"]
    assert rows(pq_out)["s001"]["source"].endswith("train-00000-of-00002.parquet#rows=0-2")

    # resume: a shard whose marker is gone (interrupted before its commit) is redone, byte-identical; the rest skip
    before = {m: (pq_out / m / "shard-00001.tar").read_bytes() for m in mods}
    os.remove(manifest.marker_url(str(pq_out), "shard-00001"))
    os.remove(pq_out / "caption" / "shard-00001.tar")
    s3 = run_job(pq_job, show_progress=False)
    assert s3["shards_processed"] == 1 and s3["shards_skipped"] == 1
    assert {m: (pq_out / m / "shard-00001.tar").read_bytes() for m in mods} == before
    assert check_output(str(pq_out)).ok
    # another shard_size maps other rows to the shards: refused rather than mixed
    with pytest.raises(Exception, match="was made from"):
        run_job(job(str(d / "pq" / "train-*.parquet"), pq_out, modalities=mods, shard_size=2,
                    parquet={"image_column": "image", "text_column": "caption", "id_column": "key"}),
                show_progress=False)


def test_parquet_shard_boundaries_and_row_group_reads(same_corpus_two_ways, monkeypatch):
    d = same_corpus_two_ways
    cols = ParquetColumns(image_column="image", text_column="caption")
    sources = plan_sources(str(d / "pq" / "train-*.parquet"), shard_size=2, parquet=cols)
    assert [(os.path.basename(s.files[0]), s.rows) for s in sources] == [
        ("train-00000-of-00002.parquet", (0, 2)), ("train-00000-of-00002.parquet", (2, 3)),
        ("train-00001-of-00002.parquet", (0, 2)), ("train-00001-of-00002.parquet", (2, 3))]
    assert [s.index for s in sources] == [0, 1, 2, 3] and sources[1].url.endswith(".parquet#rows=2-2")

    read_groups = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, row_groups=None, **kw):
        read_groups.append(tuple(row_groups))
        return real(self, *a, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    samples = list(iter_samples(sources[3]))  # rows 2..2 of the second file: only its second row group is read
    assert read_groups == [(1,)]
    assert [s.key for s in samples] == ["train-00001-of-00002_000000002"]  # no id column: file stem + row
    members = samples[0].members
    assert members["txt"].decode() == DESCRIPTIONS["moon"] and members["jpg"][:3] == b"\xff\xd8\xff"
    assert json.loads(members["json"]) == {"caption": DESCRIPTIONS["moon"], "url": "https://example.org/moon.jpg",
                                           "key": "s005"}
    with pytest.raises(ValueError, match="no text column 'alt'"):
        plan_sources(str(d / "pq" / "train-*.parquet"), parquet=ParquetColumns(text_column="alt"))


def test_parquet_rows_without_image_or_with_bad_text_are_error_rows(ray_local, tmp_path):
    items = _corpus(3)
    table = pa.table({"image": [items[0][1], None, items[2][1]],
                      "text": pa.array([b"fine text", b"ok", b"bad \xff byte"], pa.binary())})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=1)
    out = tmp_path / "out"
    s = run_job(job(str(tmp_path / "c.parquet"), out, parquet={"text_column": "text"}), show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_written"] == 1
    r = rows(out)
    assert r["c_000000001"]["error"] == "parquet row 1: image column 'image' holds no image bytes (null)"
    assert "not valid UTF-8: byte 4 (ff 20 62 79)" in r["c_000000002"]["error"]
    assert captions(out) == {"c_000000000": ["fine text"] * N_CROPS}


def test_folder_input_reads_the_text_and_json_beside_each_image(ray_local, tmp_path):
    pics = photos()
    src = tmp_path / "imgs" / "00000"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(jpeg_bytes(pics["coffee"][:120, :120]))
    (src / "a.txt").write_text("A cup  of coffee\n")
    (src / "a.json").write_text('{"url": "https://example.org/a.jpg"}')
    (src / "b.jpg").write_bytes(jpeg_bytes(pics["chelsea"][:120, :120]))
    out = tmp_path / "out"
    s = run_job(job(str(tmp_path / "imgs"), out, text={"caption_source": "input"}), show_progress=False)
    assert s["samples_written"] == 1 and s["samples_failed"] == 1
    assert captions(out) == {"00000/a": ["A cup of coffee"] * N_CROPS}
    assert rows(out)["00000/a"]["source_url"] == "https://example.org/a.jpg"


# ---------------------------------------------------------------------------------------------- 4M's own code


@pytest.fixture(scope="module")
def with_t5(ray_local, img2dataset_shard, tmp_path_factory):
    """The img2dataset shard with captions from its text and their T5 embeddings (a tiny T5 of the real class)."""
    from tests.tiny_models import save_tiny_t5

    d = tmp_path_factory.mktemp("t5")
    path, _ = img2dataset_shard
    out = d / "out"
    t5 = {"config": {"weights": save_tiny_t5(d / "t5")}, "resources": {"num_cpus": 0.5, "num_gpus": 0}}
    s = run_job(job(path, out, modalities=["rgb", "crop_settings", "caption", "t5_caption"],
                    labelers={"t5_caption": t5}), show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_written"] == 4
    return out


def test_t5_embeds_a_caption_repeated_per_crop_once(with_t5):
    """The caption list repeats one text per crop row; t5_caption holds that text's sequence once (4M's
    CaptionEmbTransform uses a single sequence for any crop), and check accepts both against 3 crops."""
    for name, data in tar_members(with_t5 / "t5_caption" / "shard-00000.tar"):
        with np.load(io.BytesIO(data)) as z:
            assert z["emb"].shape[0] == 1 and z["mask_valid"].shape[0] == 1, name
    assert rows(with_t5)["000005"]["caption_source"] == "input"
    report = check_output(str(with_t5))
    assert report.ok, [v.line() for v in report.violations]


def test_the_text_tokenizer_trains_on_the_input_captions(with_t5, tmp_path):
    from modalmill.tokenize.text_tokenizer import encode_text, load_text_tokenizer, train_text_tokenizer_on_output

    info = train_text_tokenizer_on_output(str(with_t5), str(tmp_path / "text"))
    assert info["captions"] == 4  # each sample's caption once, not once per crop row
    tok = load_text_tokenizer(info["path"])
    for text in WANT.values():
        assert 1 not in encode_text(tok, text)  # no [UNK]: the word pieces were learned from these captions


@needs_ml4m
def test_ml4m_caption_transform_reads_every_crop_row(with_t5):
    """ml-4m's own loader and CaptionTransform(aligned_captions=True) / CaptionEmbTransform read the stored caption and
    its T5 embedding for every crop row (scripts/check_captions_with_ml4m.py, run in ml-4m's environment)."""
    report = check_captions(with_t5)
    assert report["samples"] == 4 and report["errors"] == []
    assert report["crop_rows_read"] == report["t5_rows_read"] == 4 * N_CROPS
    assert report["captions"] == {k: WANT[k] for k in sorted(WANT)}


@pytest.mark.s3
@pytest.mark.slow
def test_parquet_from_s3_equals_the_local_parquet_run(ray_local, s3_env, same_corpus_two_ways, tmp_path):
    """A parquet corpus in a bucket (SeaweedFS, a glob over the bucket) is read with ranged GETs into the same output
    as the local files."""
    server, bucket = s3_env
    d = same_corpus_two_ways
    client = server.client()
    for name in sorted(os.listdir(d / "pq")):
        client.upload_file(str(d / "pq" / name), bucket, f"pq/{name}")
    mods = ["rgb", "crop_settings", "caption"]
    cols = {"image_column": "image", "text_column": "caption", "id_column": "key"}
    local = tmp_path / "local"
    run_job(job(str(d / "pq" / "train-*.parquet"), local, modalities=mods, shard_size=3, parquet=cols),
            show_progress=False)
    # the CLI in this process (s3_env set this process' S3 settings; the session's Ray gets them from here)
    cmd = ["label", f"s3://{bucket}/pq/train-*.parquet", str(tmp_path / "remote"),
           "-m", ",".join(mods), "--image-column", "image", "--text-column", "caption", "--id-column", "key",
           "--shard-size", "3", "--n-crops", str(N_CROPS), "--max-size", "128", "--no-progress", "--num-cpus", "2"]
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == EXIT_SAMPLES_FAILED, r.output[-3000:]
    for shard in ("shard-00000", "shard-00001"):
        for m in mods:
            assert (tmp_path / "remote" / m / f"{shard}.tar").read_bytes() == (local / m / f"{shard}.tar").read_bytes()
    assert rows(tmp_path / "remote")["s000"]["source"] == f"s3://{bucket}/pq/train-00000-of-00002.parquet#rows=0-2"
