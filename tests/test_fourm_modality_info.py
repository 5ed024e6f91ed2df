"""The entry 4M's MODALITY_INFO needs for a token modality (written next to a tokenizer checkpoint), a plugin's pixel
modality registered as a token modality, and the text-tokenizer install commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.schemas import modalities as reg
from modalmill.tokenize.modality_info import MODALITY_INFO_FILE, fourm_entry, write_fourm_entry


ML4M_ENTRIES = Path(__file__).parent / "fixtures" / "ml4m_modality_info" / "modality_info.json"


def test_entries_match_4ms_own_for_its_token_modalities():
    # 4M's own MODALITY_INFO entries, written by apple/ml-4m's code (scripts/make_fourm_modality_info_fixture.py)
    ref = json.loads(ML4M_ENTRIES.read_text())["entries"]
    names = [n for n in ref if n in reg.TOKEN_MODALITIES]
    assert {"tok_rgb@224", "tok_dinov2@224", "tok_dinov2_global", "tok_clip@224", "tok_imagebind_global"} <= set(names)
    for name in names:
        spec, want = reg.get_modality(name), ref[name]
        e = fourm_entry(name, spec.vocab_size, spec.n_tokens, input_size=want["input_size"] or 224)
        for k in ("type", "vocab_size", "patch_size", "min_tokens", "pretokenized"):
            assert e[k] == want[k], (name, k, e[k], want[k])
        assert want["input_size"] in (None, e["input_size"]), name  # 4M sets the global ones' at run time
        assert want["max_tokens"] in (None, e["max_tokens"]), name  # 4M leaves most to be set from the grid
        # the embeddings, sincos_pos_emb included: the default (True) for token grids, False for *_global
        assert e["encoder_embedding"] == want["encoder_embedding"], name
        assert e["decoder_embedding"] == want["decoder_embedding"], name
    with pytest.raises(ValueError, match="square grid"):
        fourm_entry("tok_x@224", 1024, 8)


def test_written_next_to_a_checkpoint_from_its_config(tmp_path):
    url = write_fourm_entry(str(tmp_path), {"modality": "canny_edge", "token_modality": "tok_canny_edge@224"})
    e = json.loads((tmp_path / MODALITY_INFO_FILE).read_text())
    assert url.endswith(MODALITY_INFO_FILE) and e["name"] == "tok_canny_edge@224" and e["vocab_size"] == 8192
    assert e["source"] == "canny_edge" and e["path"] == "tok_canny_edge@224"
    assert write_fourm_entry(str(tmp_path / "p"), {"modality": "human_poses", "token_modality": None}) is None


@pytest.fixture
def plugin_modality():
    """A plugin-like pixel modality and its token modality, removed from the registries afterwards."""
    from modalmill.labelers.base import LABELERS
    from modalmill.tokenize import labelers as tl

    reg.register_modality(reg.ModalitySpec("test_luma", reg.PIXEL, "png", "uint8", ("H", "W"), "test only"))
    cls = tl.register_token_modality("tok_test_luma@224", "test_luma", 4096, 196)
    yield cls
    for d, k in ((reg.MODALITIES, "test_luma"), (reg.MODALITIES, "tok_test_luma@224"),
                 (reg.TOKEN_MODALITIES, "tok_test_luma@224"), (tl.TOKENIZER_LABELERS, "tok_test_luma@224"),
                 (LABELERS, "tok_test_luma")):
        d.pop(k, None)
    delattr(tl, cls.__name__)


def test_a_plugin_pixel_modality_becomes_a_token_modality(plugin_modality):
    from modalmill.tokenize.fourm import FourMSpec
    from modalmill.tokenize.fourm_inputs import fourm_input_for
    from modalmill.tokenize.labelers import labeler_for_token_modality
    from modalmill.tokenize.train import default_config, vocab_and_tokens

    cls = plugin_modality
    assert labeler_for_token_modality("tok_test_luma@224") is cls and cls.requires == ("test_luma",)
    assert vocab_and_tokens("test_luma") == (4096, 196, "tok_test_luma@224")
    cfg = default_config("test_luma", "tiny")
    assert cfg["token_modality"] == "tok_test_luma@224" and cfg["model"]["n_channels"] == 1
    ad = fourm_input_for("test_luma", FourMSpec.of(cfg["model"]))  # preprocessed as 4M's 1-channel images
    label = np.tile(np.arange(64, dtype=np.uint8), (32, 1))  # 32 x 64
    t = ad.prepare(label, np.array([0, 16, 32, 32, 1]), (32, 64), 0)
    assert t.shape == (1, 224, 224) and -1.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert fourm_entry("tok_test_luma@224", 4096, 196)["patch_size"] == 16
    assert reg.register_token_modality("tok_test_luma@224", "test_luma", 4096, 196) is reg.get_modality(
        "tok_test_luma@224")  # idempotent


def test_installing_a_text_tokenizer_from_a_file_or_4m(tmp_path, monkeypatch):
    from modalmill.tokenize.text_tokenizer import FOURM_TOKENIZER_ENV, load_text_tokenizer
    from tests.fourm_text import build_4m_like_tokenizer

    src = tmp_path / "text_tokenizer_4m_wordpiece_30k.json"
    src.write_text(build_4m_like_tokenizer(["a cat on a mat"]).to_str())
    data = tmp_path / "out"
    r = CliRunner().invoke(main, ["train-tokenizer", "--modality", "caption", "--data", str(data),
                                  "--text-tokenizer", str(src)])
    assert r.exit_code == 0, r.output
    installed = data / "_modalmill" / "tokenizers" / "text" / "text_tokenizer.json"
    assert installed.read_bytes() == src.read_bytes()  # 4M's ids stay 4M's: copied byte for byte
    monkeypatch.setenv(FOURM_TOKENIZER_ENV, str(tmp_path))  # a directory holding 4M's file name
    r = CliRunner().invoke(main, ["tokenize", "--data", str(tmp_path / "out2"), "--text-tokenizer", "4m"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out2" / "_modalmill" / "tokenizers" / "text" / "text_tokenizer.json").read_bytes() \
        == src.read_bytes()
    assert load_text_tokenizer("4m").get_vocab_size() == load_text_tokenizer(str(installed)).get_vocab_size()
    bad = tmp_path / "bad.json"
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    bad.write_text(Tokenizer(WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]")).to_str())
    r = CliRunner().invoke(main, ["train-tokenizer", "--modality", "caption", "--data", str(tmp_path / "o3"),
                                  "--text-tokenizer", str(bad)])
    assert r.exit_code != 0 and "4M's layout" in r.output, r.output
    assert not (tmp_path / "o3").exists()
