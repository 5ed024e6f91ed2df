"""`modalmill tokenize --tokenizer M=FOLDER` with tokenizers in 4M's hub layout (made by ml-4m's own code, see
tests/fixtures/ml4m_tokenizers): the written tokens are 4M's ids of each stored crop, under 4M's names and
dtypes; one edge tokenizer makes tok_canny_edge@224 and tok_sam_edge@224; a local folder and an s3:// folder
give the same bytes."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas import get_modality
from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize import hub
from modalmill.tokenize.fourm_inputs import fourm_input_for

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ml4m_tokenizers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


@pytest.fixture(scope="module")
def labeled(labeled_edges, tmp_path_factory):
    dst = tmp_path_factory.mktemp("tok4m") / "out"
    shutil.copytree(labeled_edges, dst)
    return str(dst)


def test_cli_tokenizes_with_4m_tokenizers(labeled):
    rgb_tok, edge_tok = os.path.join(FIX, "rgb"), os.path.join(FIX, "edge")
    res = CliRunner().invoke(main, ["tokenize", "--data", labeled, "--modalities", "rgb,canny_edge", "--tokenizer",
                                    f"rgb={rgb_tok}", "--tokenizer", f"canny_edge={edge_tok}", "--no-progress"])
    assert res.exit_code == 0, res.output
    models = {"tok_rgb@224": hub.load(rgb_tok)[0], "tok_canny_edge@224": hub.load(edge_tok)[0]}
    n_checked = 0
    for shard in ("shard-00000", "shard-00001"):
        rgb = _members(os.path.join(labeled, "rgb", f"{shard}.tar"))
        crops = _members(os.path.join(labeled, "crop_settings", f"{shard}.tar"))
        edges = _members(os.path.join(labeled, "canny_edge", f"{shard}.tar"))
        for tok, source in (("tok_rgb@224", "rgb"), ("tok_canny_edge@224", "canny_edge")):
            toks = _members(os.path.join(labeled, tok, f"{shard}.tar"))
            assert len(toks) == len(rgb) == 5
            for name, data in toks.items():
                key = name.split(".", 1)[0]
                ids = np.load(io.BytesIO(data), allow_pickle=False)
                assert ids.dtype == np.int16 and ids.shape == (2, 196)  # 4M: int16 [n_crops, 196]
                image = get_modality("rgb").decode(rgb[f"{key}.jpg"] if f"{key}.jpg" in rgb else rgb[f"{key}.png"])
                label = image if source == "rgb" else get_modality("canny_edge").decode(edges[f"{key}.png"])
                rows = get_modality("crop_settings").decode(crops[f"{key}.npy"])
                inp = fourm_input_for(source, models[tok])
                x = torch.stack([inp.prepare(label, c, image.shape[:2], i) for i, c in enumerate(rows)])
                with torch.inference_mode():
                    np.testing.assert_array_equal(ids, models[tok].encode_ids(x).numpy())
                n_checked += 1
        marker = manifest.read_marker(labeled, shard)
        assert marker["modalities"]["tok_rgb@224"]["checkpoint"] == ckpt.checkpoint_hash(rgb_tok)
    assert n_checked == 20
    assert check_output(labeled).ok


@pytest.mark.s3
def test_4m_tokenizer_from_s3_folder_loads_the_same_weights(s3_env, tmp_path, monkeypatch):
    """The hub layout on S3 (config.json + model.safetensors under a prefix) loads like the local folder."""
    from modalmill.io import hashes

    server, bucket = s3_env
    monkeypatch.setattr(hashes, "CACHE_DIR", str(tmp_path / "cache"))
    client = server.client()
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(FIX, "rgb", name), "rb") as f:
            client.put_object(Bucket=bucket, Key=f"tok/rgb/{name}", Body=f.read())
    url = f"s3://{bucket}/tok/rgb"
    assert hub.is_fourm_folder(url)
    model, cfg = hub.load(url)
    local, local_cfg = hub.load(os.path.join(FIX, "rgb"))
    assert cfg == local_cfg
    assert list(model.state_dict()) == list(local.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert ckpt.checkpoint_hash(url) == ckpt.checkpoint_hash(os.path.join(FIX, "rgb"))
