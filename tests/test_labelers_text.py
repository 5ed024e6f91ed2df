"""The captioner (BLIP) and T5 caption embeddings: tiny random models of the real architectures with real
tokenizers/processors saved locally, loaded through the real loading paths, run inside the Ray pipeline."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import get_labeler
from modalmill.labelers.base import LabelFailure, LabelInput
from modalmill.labelers.model import ModelLabeler
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import content_hash
from modalmill.io.manifest import read_manifest
from modalmill.schemas.modalities import get_modality
from tests.tiny_models import WORDS


@pytest.fixture(scope="module")
def tiny(shared_weights):
    """The session's tiny BLIP and T5 (tests/shared_labels.py: the ones the shared job loaded)."""
    t5 = shared_weights["t5_caption"]["weights"]
    return {"caption": shared_weights["caption"], "t5_caption": shared_weights["t5_caption"],
            "dir": Path(t5).parent}


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def _inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [LabelInput(key=f"k{i}", image=rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8),
                       original_size=(60, 40 + 10 * i), crops=np.array([[0, 0, 40, 40, 0]])) for i in range(n)]


# ---------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["caption", "t5_caption"])
def test_registry_entry_is_complete_and_frozen(name):
    cls = get_labeler(name)
    assert issubclass(cls, ModelLabeler) and cls.stateful and cls.outputs == (name,)
    for attr in ("version", "architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr).strip(), attr
    fields = dataclasses.fields(cls.Config)
    assert [(f.name, f.default) for f in fields[:3]] == [("weights", None), ("device", "auto"), ("dtype", "auto")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls.Config().weights = "elsewhere"
    r = cls.default_resources
    assert r.num_cpus >= 1 and 0 < r.num_gpus <= 1 and r.memory_mb > 0 and cls.default_batch_size >= 1
    if name == "caption":
        assert cls.weights == "Salesforce/blip-image-captioning-large" and cls.input_size == 384 and len(cls.mean) == 3
        assert cls.make_config({"num_beams": 1}).num_beams == 1
        with pytest.raises(ValueError, match="min_new_tokens"):
            cls.make_config({"min_new_tokens": 50, "max_new_tokens": 10})
    else:
        assert cls.weights == "google/t5-v1_1-xxl" and cls.requires == ("caption",) and cls.Config().max_length == 77
    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert cls.weights in row and cls.license in row and f"gpu={r.num_gpus:g}" in row


# ---------------------------------------------------------------------- in the pipeline


def test_captions_then_t5_embeddings_in_the_ray_pipeline(shared_labels, tmp_path):
    """caption and t5_caption in one job (t5 reads the caption labels of the same job: the session's shared job,
    tests/shared_labels.py); then --only t5_caption --force (on a copy) recomputes the embeddings from the stored
    captions and gets the same values."""
    from transformers import AutoTokenizer

    out, s, tiny = shared_labels.out, shared_labels.summary, shared_labels.weights
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s

    tok = AutoTokenizer.from_pretrained(tiny["t5_caption"]["weights"])
    first = {}
    for shard in ("shard-00000", "shard-00001"):
        members = {m: tar_members(out / m / f"{shard}.tar") for m in ("rgb", "caption", "t5_caption")}
        keys = [n.split(".", 1)[0] for n, _ in members["rgb"]]
        assert len(keys) == 5
        for m in ("caption", "t5_caption"):
            assert [n.split(".", 1)[0] for n, _ in members[m]] == keys
        for (cname, cap_b), (tname, t5_b) in zip(members["caption"], members["t5_caption"]):
            assert cname.endswith(".json") and tname.endswith(".npz")
            caps = json.loads(cap_b)
            # the caption once per crop row (the shared job has 2 crops), embedded once (4M's one sequence per crop)
            assert isinstance(caps, list) and isinstance(caps[0], str) and caps[0].strip()
            assert caps == [caps[0]] * shared_labels.data["crops"]["n_crops"] and len(caps) == 2
            assert all(w in WORDS for w in caps[0].split())  # words of the tiny vocabulary, special tokens removed
            z = get_modality("t5_caption").decode(t5_b)
            emb, mask = z["emb"], z["mask_valid"]
            n_tok = len(tok(caps[0], truncation=True, max_length=77)["input_ids"])
            assert emb.dtype == np.float16 and mask.dtype == np.bool_
            assert emb.shape == (1, n_tok, 32) and mask.shape == (1, n_tok) and mask.all()
            assert np.isfinite(emb).all() and emb.std() > 0.1
            first[(shard, tname)] = emb

    rows = read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        prod = {p["modality"]: p for p in r["producers"]}
        assert prod["caption"]["labeler"] == "caption" and prod["t5_caption"]["labeler"] == "t5_caption"
        assert prod["caption"]["checkpoint"] == content_hash(tiny["caption"]["weights"])
        assert prod["t5_caption"]["checkpoint"] == content_hash(tiny["t5_caption"]["weights"])

    before = {m: (out / m / "shard-00000.tar").read_bytes() for m in ("rgb", "caption")}
    out, s = shared_labels.rerun(tmp_path / "again", ["t5_caption"])
    assert s["exit_code"] == EXIT_OK and s["shards_processed"] == 2, s
    assert {m: (out / m / "shard-00000.tar").read_bytes() for m in ("rgb", "caption")} == before  # untouched
    for shard in ("shard-00000", "shard-00001"):
        for name, b in tar_members(out / "t5_caption" / f"{shard}.tar"):
            again = get_modality("t5_caption").decode(b)["emb"]
            np.testing.assert_allclose(again.astype(np.float32), first[(shard, name)].astype(np.float32),
                                       rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------- in-process behaviour


def test_captioning_is_deterministic_and_takes_a_prompt(tiny):
    lab = get_labeler("caption")(tiny["caption"])
    lab.setup()
    batch = _inputs(3)
    a, b = lab.process_batch(batch), lab.process_batch(batch)
    assert a == b and all(isinstance(r["caption"][0], str) for r in a)
    assert lab.process_batch(batch[1:2]) == a[1:2]  # batch composition does not change a caption
    greedy = get_labeler("caption")({**tiny["caption"], "num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 3})
    greedy.setup()
    short = greedy.process_batch(batch[:1])[0]["caption"][0]
    assert 1 <= len(short.split()) <= 3
    prompted = get_labeler("caption")({**tiny["caption"], "prompt": "a photo of"})
    prompted.setup()
    assert prompted.process_batch(batch[:1])[0]["caption"][0].startswith("a photo of")


def test_t5_handles_caption_lists_and_reports_unusable_captions(tiny):
    lab = get_labeler("t5_caption")(tiny["t5_caption"])
    lab.setup()
    batch = _inputs(5)
    batch[0].labels = {"caption": ["a cat on the street", {"caption": "a red car"}, ""]}
    batch[1].labels = {"caption": []}
    batch[2].labels = {"caption": [42]}
    batch[3].labels = {}
    batch[4].labels = {"caption": "the astronaut in a white suit " * 30}  # longer than 77 tokens
    res = lab.process_batch(batch)
    z = res[0]["t5_caption"]
    assert z["emb"].shape[0] == 3 and z["mask_valid"].shape == z["emb"].shape[:2]
    lengths = z["mask_valid"].sum(axis=1)
    assert lengths[2] == 1 and lengths[0] > lengths[1] > 1  # "" is just </s>
    assert (z["emb"][~z["mask_valid"]] == 0).all()  # zeros past each caption's end
    assert isinstance(res[1], LabelFailure) and "no caption" in res[1].reason
    assert isinstance(res[2], LabelFailure) and "not a string" in res[2].reason
    assert isinstance(res[3], LabelFailure)
    assert res[4]["t5_caption"]["emb"].shape[1] == 77 and res[4]["t5_caption"]["mask_valid"].all()
    alone = lab.process_batch([batch[0]])[0]["t5_caption"]
    np.testing.assert_allclose(alone["emb"].astype(np.float32), z["emb"].astype(np.float32), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------- weights errors


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    for name, where in (("caption", "Salesforce/blip-image-captioning-large"), ("t5_caption", "google/t5-v1_1-xxl")):
        missing = tmp_path / f"no-{name}"
        with pytest.raises(WeightsError) as e:
            get_labeler(name)({"weights": str(missing)}).setup()
        assert str(missing) in str(e.value) and where in str(e.value)


def test_mismatched_checkpoints_are_clear_errors(tiny, tmp_path):
    with pytest.raises(WeightsError, match="holds a 'blip' model, expected t5"):
        get_labeler("t5_caption")(tiny["caption"]).setup()
    with pytest.raises(WeightsError, match="cannot load|does not fit"):
        get_labeler("caption")(tiny["t5_caption"]).setup()  # a T5 encoder is no image-to-text model
    no_tok = tmp_path / "t5-no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny["dir"] / "t5" / f).read_bytes())
    with pytest.raises(WeightsError, match="tokenizer"):
        get_labeler("t5_caption")({"weights": str(no_tok)}).setup()
