"""The trainer-side loader hands text-like modalities as 4M's token ids: a real labeled output (run_job on real
photos, model-free labelers plus a caption/det/human_poses test labeler), a WordPiece vocabulary trained on it
through the CLI, read back with ``load_dataset(..., text_tokenizer=...)`` in-process and through a DataLoader."""

import os
import pickle
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

import modalmill
from modalmill.cli import main
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers.base import Labeler, register_labeler
from modalmill.tokenize.text_tokenizer import (METADATA_IDS, det_to_text, human_poses_to_text, load_text_tokenizer,
                                     metadata_to_text)

TEXT = ["caption", "det", "metadata", "color_palette", "human_poses"]
MODS = ["rgb", "crop_settings", "color_palette", "metadata", "caption", "det", "human_poses"]
POSE_IDS = [3, 600, 1023, 0, 511, 512, 7, 99]


def captions_for(key, image):
    tone = "bright" if image.mean() > 110 else "dark"
    return [f"a {tone} photograph of sample {key} seen whole",
            f"a {tone} picture of sample {key} seen through a random crop"]


@register_labeler
class TextLabels(Labeler):
    """Model-free stand-in for the caption, detection and human-pose models: labels made from the key and image."""

    name = "test_text_labels"
    outputs = ("caption", "det", "human_poses")

    @dataclass(frozen=True)
    class Config:
        pass

    def process_batch(self, batch):
        out = []
        for inp in batch:
            h, w = inp.image.shape[:2]
            det = {"instances": [
                {"boxes": [0.0, 0.0, 1.0, 1.0], "class_name": "dog", "score": 0.9},
                {"boxes": [0.0, 0.0, 0.05, 0.05], "class_name": "cat", "score": 0.8},
                {"boxes": [0.2, 0.2, 0.6, 0.6], "class_name": "car", "score": 0.3},  # below 4M's 0.6
                {"boxes": [0.6, 0.3, 0.95, 0.7], "class_name": "teddy bear", "score": 0.7}]}
            people = {"bbox_xyxy": [[0.1 * w, 0.2 * h, 0.5 * w, 0.9 * h]], "pred_cam": [[0.9, 0.05, -0.1]],
                      "pose_tokenized": [POSE_IDS],
                      "pred_smpl_params": {"global_orient": [[np.eye(3).tolist()]],
                                           "body_pose": [[np.eye(3).tolist()] * 23], "betas": [[0.1] * 10]}}
            out.append({"caption": captions_for(inp.key, inp.image), "det": det, "human_poses": people})
        return out


@pytest.fixture(scope="module")
def labeled(ray_local, demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "out"
    job = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
                         "modalities": MODS, "batch_size": 5, "crops": {"n_crops": 2},
                         "decode": {"max_size": 160}, "labelers": {"test_text_labels": {}}})
    assert run_job(job, show_progress=False)["exit_code"] == 0
    r = CliRunner().invoke(main, ["train-tokenizer", "--modality", "caption", "--data", str(out),
                                  "--vocab-size", "4400"])
    assert r.exit_code == 0, r.output
    return str(out)


@pytest.fixture(scope="module")
def tok(labeled):
    return load_text_tokenizer(os.path.join(labeled, "_modalmill", "tokenizers", "text"))


def ids_of(sample, m):
    ids = sample[m]
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.ndim == 1
    return ids.tolist()


def check_ids(tok, ids):
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert ids[-1] == tok.token_to_id("[EOS]") and tok.token_to_id("[UNK]") not in ids
    assert tok.token_to_id("[SOS]") not in ids[:1]  # 4M's masking adds no [SOS]


def value_tokens(text):
    return [w for w in text.split() if re.fullmatch(r"v[0-3]=\d+", w)]


def test_cli_trains_the_vocabulary_on_the_output(labeled, tok):
    vocab = tok.get_vocab()
    assert 4284 < tok.get_vocab_size() <= 4400  # 4M's fixed tokens + word pieces learned from these captions
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[SOS]", "[EOS]", "v0=0")] == [0, 1, 2, 3, 204]
    assert "photograph" in vocab and "sample" in vocab
    r = CliRunner().invoke(main, ["train-tokenizer", "--modality", "rgb", "--data", labeled, "--vocab-size", "9"])
    assert r.exit_code != 0 and "--vocab-size is for the text tokenizer" in r.output


def test_text_modalities_become_4m_token_ids(labeled, tok):
    ds = modalmill.load_dataset(labeled, MODS, text_tokenizer=True, shuffle_shards=False, text_augment=False)
    samples = list(ds)
    assert len(samples) == 10
    vocab = tok.get_vocab()
    for s in samples:
        key, rgb = s["__key__"], s["rgb"]
        assert "__crop__" not in s
        for m in TEXT:
            check_ids(tok, ids_of(s, m))
            assert f"{m}.raw" in s and f"{m}.text" in s
        # caption: the whole-image entry, decoded back to its text
        want = captions_for(key, rgb.permute(1, 2, 0).numpy())[0]
        assert s["caption.raw"] == captions_for(key, rgb.permute(1, 2, 0).numpy())
        assert s["caption.text"] == want
        assert tok.decode(ids_of(s, "caption")) == want.lower()
        # det: score >= 0.6, whole image, ordered by distance to the origin (ties in stored order), x 999
        assert s["det.text"] == ("v0=0 v1=0 v2=999 v3=999 dog v0=0 v1=0 v2=50 v3=50 cat "
                                 "v0=599 v1=300 v2=949 v3=699 teddy bear")
        assert ids_of(s, "det")[-2] == vocab["teddy bear"] and vocab["car"] not in ids_of(s, "det")
        assert ids_of(s, "det")[:-1] == [vocab[w] for w in "v0=0 v1=0 v2=999 v3=999 dog v0=0 v1=0 v2=50 v3=50 "
                                         "cat v0=599 v1=300 v2=949 v3=699".split()] + [vocab["teddy bear"]]
        # metadata: 4M's chunks "v1=<id> v0=<bin>", in id order without augmentation; each value token one id
        chunks = s["metadata.text"]
        assert isinstance(chunks, list) and chunks == metadata_to_text(s["metadata.raw"], chunks=True)
        assert [int(c.split()[0][3:]) for c in chunks] == sorted(METADATA_IDS[k] for k in s["metadata.raw"])
        assert chunks[0] == f"v1=0 v0={s['metadata.raw']['original_width'] // 32}"
        assert ids_of(s, "metadata") == [vocab[w] for c in chunks for w in c.split()] + [vocab["[EOS]"]]
        # colour palette: 7 colours without augmentation, the stored RGB values as v0 tokens
        flat = s["color_palette.raw"][0]["7"]
        assert ids_of(s, "color_palette") == [vocab["v1=7"]] + [vocab[f"v0={c}"] for c in flat] + [vocab["[EOS]"]]
        # human poses: boxes in pixels of the stored rgb (4M divides by the loaded image's size)
        h, w = rgb.shape[1:]
        assert s["human_poses.text"] == human_poses_to_text(s["human_poses.raw"], original_size=(w, h))
        assert s["human_poses.text"].startswith("human v0=100 v1=200 v2=500 v3=899 ")
        hp_ids = ids_of(s, "human_poses")
        assert [i for i in hp_ids if 204 <= i < 4204] == [vocab[t] for t in value_tokens(s["human_poses.text"])]
        assert tok.decode(hp_ids, skip_special_tokens=False) == s["human_poses.text"] + " [EOS]"


def test_crops_follow_crop_settings(labeled, tok):
    base = {s["__key__"]: s for s in modalmill.load_dataset(labeled, ["rgb", "crop_settings"], shuffle_shards=False)}
    for crop in (0, 1):
        ds = modalmill.load_dataset(labeled, ["caption", "det", "human_poses"], text_tokenizer=tok, crop=crop,
                                    text_augment=False)
        assert "rgb" not in ds.modalities and ds._read[-2:] == ["crop_settings", "rgb"]  # read alongside
        for s in ds:
            ref = base[s["__key__"]]
            row = ref["crop_settings"][crop].tolist()
            hw = tuple(ref["rgb"].shape[1:])
            assert s["__crop__"] == crop and "rgb" not in s and "crop_settings" not in s
            assert tok.decode(ids_of(s, "caption")) == s["caption.raw"][crop].lower()
            assert s["det.text"] == det_to_text(s["det.raw"], crop=row, image_hw=hw)
            assert s["det.text"].startswith("v0=0 v1=0 v2=999 v3=999 dog")  # the whole-image box in every crop
            assert s["human_poses.text"] == human_poses_to_text(s["human_poses.raw"], original_size=hw[::-1],
                                                                crop=row, image_hw=hw)
    # the random crop: one row per sample, seeded by (seed, epoch, key)
    picks = [(s["__key__"], s["__crop__"]) for s in modalmill.load_dataset(labeled, ["caption"], text_tokenizer=tok,
                                                                             crop="random", seed=1)]
    assert {c for _, c in picks} == {0, 1}
    for key, c in picks:
        assert random.Random(f"modalmill-crop:1:0:{key}").randrange(2) == c
    with pytest.raises(ValueError, match=r"crop=2 but the sample has 2 crop\(s\)"):
        next(iter(modalmill.load_dataset(labeled, ["caption"], text_tokenizer=tok, crop=2)))


def test_augmentation_is_seeded_per_sample_and_survives_two_workers(labeled, tok):
    def run(loader):
        return {s["__key__"]: {m: ids_of(s, m) for m in TEXT} | {"crop": s["__crop__"], "meta": s["metadata.text"],
                                                                  "pal": s["color_palette.text"]} for s in loader}

    ds = modalmill.load_dataset(labeled, TEXT, text_tokenizer=tok, crop="random", seed=7, epoch=3)
    first = run(ds)
    assert len(first) == 10 and run(ds) == first  # same seed and epoch: the same ids
    workers = run(DataLoader(ds, batch_size=None, num_workers=2))
    assert workers == first  # ids do not depend on which worker read the shard
    assert run(pickle.loads(pickle.dumps(ds))) == first  # spawn-started workers rebuild the tokenizer from JSON
    shuffled = run(modalmill.load_dataset(labeled, TEXT, text_tokenizer=tok, crop="random", seed=7, epoch=3,
                                          shuffle_buffer=4))
    assert shuffled == first
    ds.set_epoch(4)
    other = run(ds)
    assert other != first and other.keys() == first.keys()
    for key, s in first.items():
        assert sorted(s["meta"]) == sorted(other[key]["meta"])  # a reordering of the same chunks
        k = int(s["pal"].split()[0][3:])
        assert 1 <= k <= 7 and len(s["pal"].split()) == 1 + 3 * k
    assert len({tuple(s["meta"]) for s in first.values()} | {tuple(s["meta"]) for s in other.values()}) > 10
    assert len({s["pal"].split()[0] for s in first.values()}) > 1  # palette sizes are drawn


def test_max_tokens_and_clear_errors(labeled, tok, tmp_path):
    ds = modalmill.load_dataset(labeled, ["caption", "metadata"], text_tokenizer=tok, text_augment=False,
                                text_max_tokens={"caption": 3, "metadata": 5})
    s = next(iter(ds))
    # 4M's rule: a string is cut to its first ids, chunks are dropped whole (the [EOS] chunk with them)
    full = next(iter(modalmill.load_dataset(labeled, ["caption"], text_tokenizer=tok, text_augment=False)))
    assert ids_of(s, "caption") == ids_of(full, "caption")[:3]
    assert ids_of(s, "metadata") == [tok.token_to_id(w) for c in s["metadata.text"][:2] for w in c.split()]
    with pytest.raises(ValueError, match="text_tokenizer needs decode=True"):
        modalmill.load_dataset(labeled, ["caption"], text_tokenizer=tok, decode=False)
    with pytest.raises(ValueError, match="crop must be None"):
        modalmill.load_dataset(labeled, ["caption"], text_tokenizer=tok, crop="centre")
    with pytest.raises(ValueError, match="text_max_tokens: rgb not text-like"):
        modalmill.load_dataset(labeled, ["caption"], text_tokenizer=tok, text_max_tokens={"rgb": 4})
    with pytest.raises(FileNotFoundError, match="no text tokenizer here"):
        modalmill.load_dataset(labeled, ["caption"], text_tokenizer=str(tmp_path))
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    with pytest.raises(ValueError, match=r"token '\[PAD\]' has id None"):
        modalmill.load_dataset(labeled, ["caption"], text_tokenizer=Tokenizer(WordPiece(unk_token="[UNK]")))


def test_sam_instance_serialises_the_crops_entry_without_unknown_words(tok):
    from modalmill.tokenize.text_tokenizer import encode_sequence, sam_instance_to_text, serialise_label

    def entry(offset):
        square = np.array([[[20, 20]], [[200, 20]], [[200, 200]], [[20, 200]]], dtype=np.int32)  # (x, y)
        return {"points": [[square]], "bbox": np.array([[20, 20, 200, 200]], dtype=np.int32),
                "token_ids": (np.arange(16, dtype=np.int64) * 60 + offset)[None] % 1024}

    entries = np.empty(2, dtype=object)
    entries[:] = [entry(0), entry(5)]  # one entry per crop, as the stored object array
    for i in (0, 1):
        text = serialise_label("sam_instance", entries, crop_index=i)
        assert text == sam_instance_to_text(entries[i]) and "polygon" in text and "point" in text
        ids = encode_sequence(tok, text)
        check_ids(tok, ids)
        assert [t for t in ids if 204 <= t < 4204] == [tok.token_to_id(w) for w in value_tokens(text)]
    assert serialise_label("sam_instance", entries, crop_index=1) != serialise_label("sam_instance", entries)
    with pytest.raises(ValueError, match="no entry for crop 2"):
        serialise_label("sam_instance", entries, crop_index=2)
