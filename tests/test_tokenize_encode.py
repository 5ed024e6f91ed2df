"""Token shards: `tokenize_output` / `modalmill tokenize` write tok_*@224 aligned with every other modality."""

import hashlib
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import EXIT_OK, JobError, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas import get_modality
from modalmill.jobs.stats import corpus_stats
from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize.fourm_inputs import fourm_input_for
from modalmill.jobs.tokenize_output import parse_tokenizer_args, tokenize_output
from modalmill.tokenize.train import train_tokenizer

N_CROPS = 3
LABELS = ["rgb", "crop_settings", "canny_edge"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def work(ray_local, demo_corpus, tmp_path_factory):
    """A labeled output (kept pristine as a template) and three tiny checkpoints trained on it in-process."""
    root = tmp_path_factory.mktemp("tok_encode")
    labeled = root / "labeled"
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(labeled),
                          "modalities": LABELS, "batch_size": 5, "crops": {"n_crops": N_CROPS},
                          "decode": {"max_size": 256}})
    assert run_job(spec, show_progress=False)["exit_code"] == EXIT_OK
    ck = {}
    # a few steps of 4M-format (lucid) tokenizers
    for name, source, quantizer, seed, steps in (("edge", "canny_edge", "lucid", 0, 12),
                                                 ("edge2", "canny_edge", "lucid", 1, 8), ("rgb", "rgb", "lucid", 0, 2)):
        ck[name] = str(root / "ck" / name)
        train_tokenizer(source, str(labeled), ck[name], preset="tiny", quantizer=quantizer, steps=steps, use_ray=False,
                        show_progress=False, config={"train": {"seed": seed}})
    return {"root": root, "labeled": str(labeled), "ck": ck}


def _copy(work, name):
    dst = work["root"] / name
    shutil.copytree(work["labeled"], dst)
    return str(dst)


def test_token_shards_are_aligned_valid_recorded_and_idempotent(work):
    out = _copy(work, "a")
    s = tokenize_output(out, ["canny_edge", "tok_rgb@224"], {"canny_edge": work["ck"]["edge"],
                                                               "rgb": work["ck"]["rgb"]}, show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["shards_processed"] == 4 and s["samples_written"] == 20
    toks = ["tok_canny_edge@224", "tok_rgb@224"]
    codes = {"tok_canny_edge@224": 64, "tok_rgb@224": 64}
    models = {"tok_canny_edge@224": ckpt.load_tokenizer(work["ck"]["edge"])[0]}
    for shard in ("shard-00000", "shard-00001"):
        members = {m: _members(os.path.join(out, m, f"{shard}.tar")) for m in LABELS + toks}
        keys = [n.split(".", 1)[0] for n, _ in members["rgb"]]
        assert len(keys) == 5
        for m in toks + ["canny_edge", "crop_settings"]:  # same keys, same order in every folder
            assert [n.split(".", 1)[0] for n, _ in members[m]] == keys, m
        for m in toks:
            spec = get_modality(m)
            assert len(np.unique(np.concatenate([np.load(io.BytesIO(d)).ravel() for _, d in members[m]]))) > 1, m
            for name, data in members[m]:
                assert name.endswith(".npy")
                ids = np.load(io.BytesIO(data), allow_pickle=False)
                assert ids.dtype == np.int16 and ids.shape == (N_CROPS, 196)
                assert ids.min() >= 0 and ids.max() < codes[m] <= spec.vocab_size
        marker = manifest.read_marker(out, shard)
        assert marker["keys"] == keys
        for m in toks:
            rec = marker["modalities"][m]
            assert rec["sha256"] == _sha(os.path.join(out, m, f"{shard}.tar"))
            assert rec["labeler"] == m.split("@")[0] and rec["n"] == 5
        assert marker["modalities"]["tok_rgb@224"]["checkpoint"] == ckpt.checkpoint_hash(work["ck"]["rgb"])
        # row i of a sample's tokens is its stored crop i, cut from its stored edge map, encoded by the checkpoint
        crops_of = dict(members["crop_settings"])
        edge_of = dict(members["canny_edge"])
        tok_of = dict(members["tok_canny_edge@224"])
        key = keys[2]
        crops = get_modality("crop_settings").decode(crops_of[f"{key}.npy"])
        edge = get_modality("canny_edge").decode(edge_of[f"{key}.png"])
        ad = fourm_input_for("canny_edge", models["tok_canny_edge@224"])
        x = torch.stack([ad.prepare(edge, c, edge.shape[:2], i) for i, c in enumerate(crops)])
        with torch.inference_mode():
            expect = models["tok_canny_edge@224"].encode_ids(x).numpy()
        assert np.array_equal(np.load(io.BytesIO(tok_of[f"{key}.npy"])), expect)
    rows = manifest.read_manifest(out).to_pylist()
    assert len(rows) == 10
    prod = {p["modality"]: p for p in rows[0]["producers"]}
    assert prod["tok_canny_edge@224"]["checkpoint"] == ckpt.checkpoint_hash(work["ck"]["edge"])
    report = check_output(out)
    assert report.ok, [v.line() for v in report.violations]

    before = {m: _sha(os.path.join(out, m, "shard-00000.tar")) for m in toks}
    work["reference"] = {shard: _sha(os.path.join(out, "tok_canny_edge@224", f"{shard}.tar"))
                         for shard in ("shard-00000", "shard-00001")}
    again = tokenize_output(out, ["canny_edge", "rgb"], {"canny_edge": work["ck"]["edge"], "rgb": work["ck"]["rgb"]},
                            show_progress=False)
    assert again["shards_processed"] == 0 and again["shards_skipped"] == 4
    assert before == {m: _sha(os.path.join(out, m, "shard-00000.tar")) for m in toks}

    # tokens of another checkpoint are stale: refused without --force, rewritten with it
    with pytest.raises(JobError, match="--force"):
        tokenize_output(out, ["canny_edge"], {"canny_edge": work["ck"]["edge2"]}, show_progress=False)
    forced = tokenize_output(out, ["canny_edge"], {"canny_edge": work["ck"]["edge2"]}, force=True,
                             show_progress=False)
    assert forced["shards_processed"] == 2
    assert _sha(os.path.join(out, "tok_canny_edge@224", "shard-00000.tar")) != before["tok_canny_edge@224"]
    assert _sha(os.path.join(out, "tok_rgb@224", "shard-00000.tar")) == before["tok_rgb@224"]
    assert manifest.read_marker(out, "shard-00000")["modalities"]["tok_canny_edge@224"]["checkpoint"] == \
        ckpt.checkpoint_hash(work["ck"]["edge2"])
    assert check_output(out).ok

    # stats: codebook usage counts against the codes of the checkpoint that wrote the tokens (the newest run's)
    st = corpus_stats(out)["modalities"]
    for m, ck_name, n_codes in (("tok_canny_edge@224", "edge2", 64), ("tok_rgb@224", "rgb", 64)):
        ids = np.concatenate([np.load(io.BytesIO(d)).ravel() for shard in ("shard-00000", "shard-00001")
                              for _, d in _members(os.path.join(out, m, f"{shard}.tar"))])
        assert st[m]["tokenizer"] == {"checkpoint": work["ck"][ck_name], "codebook_size": n_codes}
        assert st[m]["used"] == len(np.unique(ids)) and st[m]["usage"] == pytest.approx(len(np.unique(ids)) / n_codes)
        assert st[m]["vocab_size"] == get_modality(m).vocab_size


def test_cli_tokenize_gives_byte_identical_token_shards(work):
    """`modalmill tokenize` on a fresh copy of the labels: the same labels, checkpoint and settings give
    byte-identical token tars to the first test's `tokenize_output` run (and the CLI's errors are one line)."""
    if "reference" not in work:  # this test run alone
        ref = _copy(work, "ref")
        tokenize_output(ref, ["canny_edge"], {"canny_edge": work["ck"]["edge"]}, show_progress=False)
        work["reference"] = {shard: _sha(os.path.join(ref, "tok_canny_edge@224", f"{shard}.tar"))
                             for shard in ("shard-00000", "shard-00001")}
    first = _copy(work, "cli")
    res = CliRunner().invoke(main, ["tokenize", "--data", first, "--modalities", "canny_edge", "--tokenizer",
                                    f"canny_edge={work['ck']['edge']}", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 shard(s) processed" in res.output
    for shard in ("shard-00000", "shard-00001"):
        assert _sha(os.path.join(first, "tok_canny_edge@224", f"{shard}.tar")) == work["reference"][shard]
    res = CliRunner().invoke(main, ["tokenize", "--data", first, "--modalities", "depth"])
    assert res.exit_code == 1 and "no 'depth' labels to tokenize" in res.output
    with pytest.raises(ValueError, match="expected MODALITY=PATH"):
        parse_tokenizer_args(["canny_edge"])
    with pytest.raises(KeyError, match="no tokenizer writes"):
        parse_tokenizer_args(["caption=/x"])


def test_cli_train_tokenizer_in_process(work, tmp_path):
    out = str(tmp_path / "tok")
    res = CliRunner().invoke(main, ["train-tokenizer", "--modality", "canny_edge", "--data", work["labeled"], "--out",
                                    out, "--preset", "tiny", "--quantizer", "lucid", "--steps", "2", "--in-process",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "canny_edge tokenizer (lucid, 64 codes, 2 steps" in res.output and "codebook usage" in res.output
    assert os.path.exists(os.path.join(out, ckpt.MODEL_FILE))
