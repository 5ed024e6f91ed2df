"""Quality scores from a COYO-style parquet corpus reach `metadata`, and 4M's metadata binning (ml-4m's own
MetadataTransform, fixture tests/fixtures/metadata_binning, scripts/make_metadata_binning_fixture.py) gives the
same tokens as modalmill's serialiser of what was written."""

import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from modalmill.io import manifest
from modalmill.io.scores import DEFAULT_INPUT_SCORES, input_scores
from modalmill.io.tars import decode_member, iter_tar_groups
from modalmill.jobs.democorpus import photos
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers.modelfree import MetadataLabeler
from modalmill.schemas import get_modality
from modalmill.tokenize.text_tokenizer import metadata_to_text

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "metadata_binning", "expected.json")


def _fixture():
    with open(FIXTURE) as f:
        return json.load(f)["records"]


def test_modalmill_bins_metadata_as_ml4m_does():
    for rec in _fixture():
        assert metadata_to_text(rec["metadata"], chunks=True) == rec["chunks"], rec["metadata"]


def _jpeg(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coyo(ray_local, tmp_path_factory):
    """A COYO-700M-style parquet file: image bytes, alt-text, the score columns; two rows without usable scores."""
    d = tmp_path_factory.mktemp("coyo")
    recs = _fixture()
    pics = list(photos().values())
    rows = []
    for i, rec in enumerate(recs):
        img = np.asarray(Image.fromarray(pics[i % len(pics)]).resize((96, 80)))
        rows.append({"id": f"coyo{i:03d}", "image": _jpeg(img), "text": f"photo {i}",
                     "aesthetic_score_laion_v2": rec["metadata"]["aesthetic_score"],
                     "watermark_score": rec["metadata"]["watermark_score"], "clip_similarity_vitl14": 0.3})
    rows.append({**rows[0], "id": "coyo_null", "aesthetic_score_laion_v2": None, "watermark_score": None})
    rows.append({**rows[1], "id": "coyo_nan", "aesthetic_score_laion_v2": float("nan"), "watermark_score": 0.2})
    pq.write_table(pa.Table.from_pylist(rows), str(d / "coyo.parquet"))
    out = d / "out"
    job = job_from_dict({"input": str(d / "coyo.parquet"), "output": str(out),
                         "modalities": ["rgb", "crop_settings", "metadata"], "crops": {"n_crops": 1},
                         "parquet": {"image_column": "image", "text_column": "text", "id_column": "id"}})
    assert run_job(job, show_progress=False)["exit_code"] == EXIT_OK
    return str(out), recs


def _metadata(out):
    spec = get_modality("metadata")
    got = {}
    for shard in manifest.list_markers(out):
        for key, members in iter_tar_groups(os.path.join(out, "metadata", f"{shard}.tar")):
            got[key] = decode_member(spec, "json", members["json"])
    return got


def test_coyo_scores_reach_metadata_and_bin_as_in_4m(coyo):
    out, recs = coyo
    meta = _metadata(out)
    for i, rec in enumerate(recs):
        m = meta[f"coyo{i:03d}"]
        for field in ("aesthetic_score", "watermark_score"):
            assert m[field] == pytest.approx(rec["metadata"][field], abs=1e-4)
        # the score chunks of what modalmill wrote are ml-4m's chunks for those scores (ids 19 and 20)
        ours = [c for c in metadata_to_text(m, chunks=True) if c.startswith(("v1=19 ", "v1=20 "))]
        theirs = [c for c in rec["chunks"] if c.startswith(("v1=19 ", "v1=20 "))]
        assert ours == theirs, (rec["metadata"], m)
    assert "aesthetic_score" not in meta["coyo_null"] and "watermark_score" not in meta["coyo_null"]
    assert "aesthetic_score" not in meta["coyo_nan"] and meta["coyo_nan"]["watermark_score"] == 0.2


def test_manifest_records_where_each_score_came_from(coyo):
    out, _ = coyo
    rows = {r.key: r for s in manifest.list_markers(out) for r in manifest.read_rows(out, s)}
    assert json.loads(rows["coyo000"].score_sources) == {"aesthetic_score": "input:aesthetic_score_laion_v2",
                                                         "watermark_score": "input:watermark_score"}
    assert rows["coyo_null"].score_sources is None
    assert json.loads(rows["coyo_nan"].score_sources) == {"watermark_score": "input:watermark_score"}


def test_input_score_mapping_is_configurable_and_checked():
    src = {"aes": 6.5, "wm": 0.1, "aesthetic_score_laion_v2": 3.0}
    lab = MetadataLabeler({"input_scores": {"aesthetic_score": "aes"}})
    assert input_scores(src, lab.config.input_scores) == {"aesthetic_score": 6.5}
    assert input_scores(src, DEFAULT_INPUT_SCORES) == {"aesthetic_score": 3.0}
    assert input_scores(src, MetadataLabeler({"input_scores": {}}).config.input_scores) == {}
    with pytest.raises(ValueError, match="not 4M-21 metadata"):
        MetadataLabeler({"input_scores": {"nsfw": "punsafe"}})
    # the default mapping leaves the config hash as it was before the setting existed
    assert "input_scores" not in MetadataLabeler().config_dict()
    assert "input_scores" in lab.config_dict()
    assert not math.isnan(input_scores({"watermark_score": 0.25}, DEFAULT_INPUT_SCORES)["watermark_score"])


def test_only_metadata_takes_scores_from_the_stored_samples_source(coyo, tmp_path):
    """An update run (``--only metadata``) reads samples back from the stored tars: their scores still come from
    the source json the manifest kept, and the rewritten rows say so."""
    first, recs = coyo
    base = {"input": os.path.join(os.path.dirname(first), "coyo.parquet"), "output": str(tmp_path / "out"),
            "modalities": ["rgb", "crop_settings"], "crops": {"n_crops": 1},
            "parquet": {"image_column": "image", "text_column": "text", "id_column": "id"}}
    out = base["output"]
    assert run_job(job_from_dict(base), show_progress=False)["exit_code"] == EXIT_OK
    rows = {r.key: r for s in manifest.list_markers(out) for r in manifest.read_rows(out, s)}
    assert all(r.score_sources is None for r in rows.values())  # no metadata written yet
    s = run_job(job_from_dict(base), only=["metadata"], show_progress=False)
    assert s["exit_code"] == EXIT_OK and {r["mode"] for r in s["shards"]} == {"update"}
    meta = _metadata(out)
    for i, rec in enumerate(recs):
        for field in ("aesthetic_score", "watermark_score"):
            assert meta[f"coyo{i:03d}"][field] == pytest.approx(rec["metadata"][field], abs=1e-4)
    assert "aesthetic_score" not in meta["coyo_null"] and meta["coyo_nan"]["watermark_score"] == 0.2
    rows = {r.key: r for s in manifest.list_markers(out) for r in manifest.read_rows(out, s)}
    assert json.loads(rows["coyo000"].score_sources) == {"aesthetic_score": "input:aesthetic_score_laion_v2",
                                                         "watermark_score": "input:watermark_score"}
    assert rows["coyo_null"].score_sources is None
    assert json.loads(rows["coyo_nan"].score_sources) == {"watermark_score": "input:watermark_score"}
    assert all("metadata" in r.modalities for r in rows.values())
