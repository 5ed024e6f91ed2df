"""`modalmill show` (one PNG per sample, a renderer for every registered modality) and `modalmill stats`."""

import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tests.labelers_for_tests  # noqa: F401  (registers the test labelers)
from modalmill.cli import main
from modalmill.jobs.runner import run_job
from modalmill.jobs.show import PANEL, Context, render_values, renderer_for, show_sample
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest
from modalmill.io.writers import TarShardWriter
from modalmill.schemas import MODALITIES, get_modality
from modalmill.schemas.modalities import ARRAY, FEATURE_MAP, GLOBAL, IMAGE, PIXEL, TEXT, TOKENS

MODS = ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]
TOK = "tok_rgb@224"
H, W = 96, 128


# ============================================================================ synthetic values of every modality


def photo():
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((W, H)))


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


TEXT_EXAMPLES = {
    "caption": ["an astronaut in front of a flag", {"caption": "a woman in a space suit"}],
    "det": {"instances": [{"boxes": [0.25, 0.1, 0.75, 0.95], "class_name": "person", "score": 0.92},
                          {"boxes": [0.0, 0.0, 0.3, 0.4], "class_name": "flag", "score": 0.41}]},
    "metadata": {"brightness": 112.5, "original_width": 512, "original_height": 384, "colorfulness": 40.0},
    "color_palette": [{str(k): [(40 * j) % 256 for j in range(3 * k)] for k in range(1, 8)}],
    "human_poses": {"bbox_xyxy": [[100.0, 40.0, 400.0, 380.0]], "pred_cam": [[0.9, 0.0, 0.1]],
                    "pred_smpl_params": {"global_orient": [np.eye(3)[None].tolist()],
                                         "body_pose": [np.tile(np.eye(3), (23, 1, 1)).tolist()],
                                         "betas": [[0.0] * 10]},
                    "pose_tokenized": [[1, 2, 3, 4, 5, 6, 7, 8]]},
    "sam_mask": {"height": H, "width": W, "instances": [
        {"polygons": [_square(10, 10, 50, 60)], "bbox_xyxy": [10, 10, 50, 60], "area": 2091, "predicted_iou": 0.9,
         "stability_score": 0.95},
        {"polygons": [[[70, 20], [120, 30], [90, 90]]], "bbox_xyxy": [70, 20, 120, 90], "area": 1700,
         "predicted_iou": 0.8, "stability_score": 0.9}]},
    "pose_keypoints": {"height": H, "width": W, "people": [{"keypoints": [
        [40 + 2 * (i % 11), 10 + 2.5 * i, 0.0, 0.9] for i in range(33)]}]},
    "ocr": {"height": H, "width": W, "lines": [
        {"polygon": [[10, 10], [150, 12], [150, 40], [10, 38]], "text": "Region-based segmentation", "score": 0.99},
        {"polygon": [[20, 60], [90, 60], [90, 80], [20, 80]], "text": "markers", "score": 0.8}]},
}


def sam_instance_example():
    """4M's pickled object array: per crop, contours in the 224x224 crop, 16 token ids and a box per instance."""
    entry = {"points": [[np.array(_square(20, 30, 120, 150), np.int32).reshape(-1, 1, 2)]],
             "token_ids": np.arange(16).reshape(1, 16), "bbox": np.array([[30, 20, 150, 120]])}
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = entry, entry
    return arr


def synthetic(spec):
    rng = np.random.default_rng(0)
    if spec.kind == IMAGE:
        return photo()
    if spec.kind == PIXEL:
        shape = tuple(H if d == "H" else W if d == "W" else d for d in spec.shape)
        if spec.name == "semseg_coco":
            labels = (np.arange(H)[:, None] // 24 * 7 + np.arange(W)[None] // 32).astype(np.uint8)
            labels[:10] = 255
            return labels
        yy, xx = np.mgrid[0:H, 0:W]
        ramp = (xx + yy) / (H + W)
        return np.broadcast_to((ramp * np.iinfo(spec.dtype).max)[..., None] if len(shape) == 3
                               else ramp * np.iinfo(spec.dtype).max, shape).astype(spec.dtype)
    if spec.kind == FEATURE_MAP:  # one map per crop
        return rng.standard_normal((2, 6, 8, 16)).astype(np.float16)
    if spec.kind == GLOBAL:
        return rng.standard_normal((2, 64)).astype(np.float16)
    if spec.kind == TOKENS:
        return rng.integers(0, spec.vocab_size, (2, spec.n_tokens)).astype(spec.dtype)
    if spec.name == "crop_settings":
        return np.array([[0, 16, 96, 96, 0], [5, 0, 80, 100, 1]], np.int64)
    if spec.name == "t5_caption":
        return {"emb": rng.standard_normal((2, 6, 4096)).astype(np.float16),
                "mask_valid": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)}
    if spec.name == "sam_instance":
        return sam_instance_example()
    if spec.name in TEXT_EXAMPLES:
        return TEXT_EXAMPLES[spec.name]
    if spec.kind in (TEXT, ARRAY):
        return {"value": 1}  # a modality registered later: the kind's generic renderer draws it
    raise AssertionError(f"no synthetic example for {spec.name!r} (kind {spec.kind})")


def through_codec(spec, value):
    """Encode (validates the example against the spec) and decode, as `show` reads a member."""
    if spec.name == "sam_instance" or (spec.kind in (TEXT, ARRAY) and spec.name not in TEXT_EXAMPLES
                                       and spec.ext != "npz"):
        return value  # pickled object arrays / generic stand-ins are not the registry codec's business
    return spec.decode(spec.encode(value, key="k", image_hw=(H, W)))


@pytest.mark.parametrize("name", sorted(MODALITIES))
def test_every_registered_modality_has_a_renderer(name):
    spec = get_modality(name)
    renderer_for(spec)  # raises when there is none
    value = through_codec(spec, synthetic(spec))
    ctx = Context(rgb=photo(), crops=synthetic(get_modality("crop_settings")), original_size=(512, 384))
    result = render_values({name: value}, key="k", ctx=ctx)
    assert [p.modality for p in result.panels] == [name]
    panel = result.panels[0]
    assert panel.ok, panel.subtitle
    x0, y0, x1, y1 = panel.box
    assert max(x1 - x0, y1 - y0) == PANEL  # fitted to the panel
    pixels = np.asarray(result.image.crop(panel.box), np.float32)
    assert pixels.std() > 10, "the panel is (nearly) blank"


def test_tokens_render_one_colour_per_id_and_features_by_pca():
    spec = get_modality("tok_dinov2_global")
    ids = np.array([[5, 5, 5, 5, 9, 9, 9, 9, 5, 5, 5, 5, 9, 9, 9, 9]], np.int16)
    res = render_values({spec.name: ids})
    crop = np.asarray(res.image.crop(res.panels[0].box))
    colours = {tuple(c) for c in crop.reshape(-1, 3)}
    from modalmill.jobs.show import id_colours, pca_rgb

    assert tuple(id_colours(np.array(5))) in colours and tuple(id_colours(np.array(9))) in colours
    # PCA of a feature map whose features vary along one direction: the first component orders the pixels
    fm = np.zeros((4, 4, 8), np.float32)
    fm[..., 0] = np.arange(16).reshape(4, 4)
    rgb, explained = pca_rgb(fm.reshape(-1, 8))
    assert explained > 0.99 and np.all(np.diff(rgb[:, 0].astype(int)) >= 0)


# ============================================================================ a real output


def tar_arrays(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


@pytest.fixture(scope="module")
def output(ray_local, demo_corpus, tmp_path_factory):
    """A real labeled output with one sample failing a labeler, plus tokens written as a tokenizer stage would."""
    out = tmp_path_factory.mktemp("show") / "out"
    victim = "000002"
    job = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
                         "modalities": MODS + ["caption"], "crops": {"n_crops": 2}, "decode": {"max_size": 200},
                         "labelers": {"test_caption_or_fail": {"config": {"fail_keys": [victim]}}}})
    s = run_job(job, show_progress=False)
    assert s["samples_failed"] == 1 and s["samples_written"] == 9
    spec = get_modality(TOK)
    rng = np.random.default_rng(1)
    for shard, marker in manifest.list_markers(str(out)).items():
        w = TarShardWriter(str(out / TOK / f"{shard}.tar"))
        for key in marker["keys"]:
            ids = np.minimum(rng.zipf(1.3, (2, 196)), spec.vocab_size - 1).astype(np.int16)  # skewed usage
            w.write(key, spec.ext, spec.encode(ids, key))
        marker["modalities"][TOK] = {"labeler": "test", **w.commit()}
        manifest.write_marker(str(out), shard, marker)
    return out


def test_show_writes_a_readable_png_with_one_panel_per_modality(output, tmp_path):
    key = manifest.read_marker(str(output), "shard-00001")["keys"][1]
    target = tmp_path / "sample.png"
    res = show_sample(str(output), key, out=str(target))
    assert res.path == str(target) and res.shard == "shard-00001"
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(target) as img:
        assert img.size == res.image.size and img.size[0] >= 4 * PANEL and img.size[1] >= 2 * PANEL
    want = set(manifest.read_marker(str(output), "shard-00001")["modalities"])
    assert [p.modality for p in res.panels if p.ok] == [p.modality for p in res.panels]
    assert {p.modality for p in res.panels} == want and len(res.panels) == len(want)
    # the rgb panel shows this sample's stored image
    with tarfile.open(output / "rgb" / "shard-00001.tar") as t:
        stored = get_modality("rgb").decode(t.extractfile(f"{key}.jpg").read())
    panel = next(p for p in res.panels if p.modality == "rgb")
    shown = np.asarray(res.image.crop(panel.box), np.float32)
    expected = np.asarray(Image.fromarray(stored).resize(shown.shape[1::-1]), np.float32)
    assert np.abs(shown - expected).mean() < 6


def test_show_cli_default_path_tokenizer_hook_and_unknown_key(output, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = manifest.read_marker(str(output), "shard-00000")["keys"][0]
    r = CliRunner().invoke(main, ["show", str(output), "--key", key])
    assert r.exit_code == 0, r.output
    path = r.output.strip().splitlines()[-1]
    assert path == f"out_{key}.png" and (tmp_path / path).is_file()
    # a --tokenizer that is not there is one clear line naming it (no "not available yet": the loader exists)
    r = CliRunner().invoke(main, ["show", str(output), "--key", key, "--tokenizer", f"{TOK}=/nowhere"])
    assert r.exit_code == 1 and "/nowhere" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "not available yet" not in r.output
    r = CliRunner().invoke(main, ["show", str(output), "--key", key, "--tokenizer", "rgb=/x"])
    assert r.exit_code == 1 and "not a token modality" in r.output
    r = CliRunner().invoke(main, ["show", str(output), "--key", "no-such-key"])
    assert r.exit_code == 1 and "no sample with key 'no-such-key'" in r.output


def test_tokenizer_hook_decodes_tokens_with_a_4m_format_tokenizer(tmp_path):
    """A (tiny, untrained) 4M-format tokenizer written by train-tokenizer's exporter decodes ids into pictures;
    ml-4m's own VQ-VAE folder (tests/fixtures/ml4m_tokenizers/rgb) too; a DiVAE is refused in one line."""
    import os

    train = pytest.importorskip("modalmill.tokenize.train")
    from modalmill.jobs.show import TokenizerUnavailable, load_tokenizers
    from modalmill.tokenize.fourm import FourMTokenizer

    config = train.default_config("canny_edge", "tiny")
    url = train.save_fourm(FourMTokenizer(config["model"]), train.export_config(config, "(none)", 0, 1),
                           str(tmp_path / "tok"))
    name = config["token_modality"]
    decoders = load_tokenizers({name: url})
    ids = np.random.default_rng(0).integers(0, config["model"]["codebook_size"], (2, 196))
    pictures = decoders[name].decode_tokens(ids)
    assert pictures.shape == (2, 224, 224, 3) and pictures.dtype == np.uint8
    res = render_values({name: ids.astype(np.int16)}, ctx=Context(tokenizers=decoders))
    assert res.panels[0].ok and "decoded with the tokenizer" in res.panels[0].subtitle
    with pytest.raises(ValueError, match="this checkpoint makes"):
        load_tokenizers({"tok_rgb@224": url})
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "ml4m_tokenizers")
    rgb = load_tokenizers({"tok_rgb@224": os.path.join(fixtures, "rgb")})["tok_rgb@224"]
    assert rgb.decode_tokens(ids).shape == (2, 224, 224, 3)
    with pytest.raises(TokenizerUnavailable, match="DiVAE.decode_tokens"):
        load_tokenizers({"tok_canny_edge@224": os.path.join(fixtures, "edge")})


# ============================================================================ stats


def test_stats_json_matches_independent_counts(output):
    r = CliRunner().invoke(main, ["stats", str(output), "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["shards"] == 2 and st["samples_read"] == 10 and st["samples_ok"] == 9 and st["samples_failed"] == 1
    assert st["failures_by_reason"] == {"label:test_caption_or_fail: chosen to fail": 1}

    members = {m: [member for shard in ("shard-00000", "shard-00001")
                   for member in tar_arrays(output / m / f"{shard}.tar")] for m in MODS + ["caption", TOK]}
    for m, found in members.items():
        assert st["modalities"][m]["samples"] == len(found) == 9

    tokens = np.concatenate([np.load(io.BytesIO(b)).ravel() for _, b in members[TOK]]).astype(np.int64)
    hist = np.bincount(tokens, minlength=16384)
    p = hist[hist > 0] / hist.sum()
    tok = st["modalities"][TOK]
    assert tok["histogram"] == hist.tolist() and tok["tokens"] == tokens.size == 9 * 2 * 196
    assert tok["used"] == len(np.unique(tokens)) and tok["usage"] == pytest.approx(len(np.unique(tokens)) / 16384)
    assert tok["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert tok["top"][0] == [int(hist.argmax()), int(hist.max())]

    edges = np.concatenate([np.asarray(Image.open(io.BytesIO(b))).ravel() for _, b in members["canny_edge"]])
    vals = st["modalities"]["canny_edge"]["values"]
    assert (vals["min"], vals["max"], vals["count"]) == (int(edges.min()), int(edges.max()), edges.size)
    assert vals["mean"] == pytest.approx(edges.astype(np.float64).mean())

    meta = [json.loads(b) for _, b in members["metadata"]]
    for field in ("brightness", "entropy", "original_width"):
        got = st["modalities"]["metadata"]["fields"][field]
        values = [m[field] for m in meta]
        assert (got["min"], got["max"]) == (min(values), max(values))
        assert got["mean"] == pytest.approx(sum(values) / len(values))
    widths = [Image.open(io.BytesIO(b)).size[0] for _, b in members["rgb"]]
    assert st["modalities"]["rgb"]["ranges"]["width"]["max"] == max(widths)
    # a caption member holds one entry per crop row (2 here): counted as such, distinct texts apart
    captions = [json.loads(b) for _, b in members["caption"]]
    got = st["modalities"]["caption"]["ranges"]
    assert all(len(c) == 2 for c in captions) and (got["entries"]["min"], got["entries"]["max"]) == (2, 2)
    distinct = [len({e["caption"] if isinstance(e, dict) else e for e in c}) for c in captions]
    assert (got["distinct"]["min"], got["distinct"]["max"]) == (min(distinct), max(distinct))

    r = CliRunner().invoke(main, ["stats", str(output)])
    assert r.exit_code == 0 and "label:test_caption_or_fail: chosen to fail" in r.output
    assert "tokenizer" not in tok  # no run record names a checkpoint: usage is of the vocabulary
    assert f"ids used {tok['used']}/16384" in r.output


def test_a_plugin_modality_is_drawn_by_its_kind_until_it_registers_a_renderer():
    """The registry of renderers: by name, else by kind; `renders` lets a package add its own picture."""
    from modalmill.jobs.show import KIND_RENDERERS, RENDERERS, renders
    from modalmill.schemas import ModalitySpec

    spec = ModalitySpec("test_show_plugin_grey", PIXEL, "png", "uint8", ("H", "W"), "a plugin's pixel label")
    value = np.tile(np.arange(W, dtype=np.uint8), (H, 1))
    assert renderer_for(spec) is KIND_RENDERERS[PIXEL]
    try:
        @renders(spec.name)
        def draw(spec, value, ctx):
            return Image.new("RGB", (40, 30), (255, 0, 0)), "drawn by the plugin"

        assert renderer_for(spec) is draw
        pic, subtitle = renderer_for(spec)(spec, value, Context())
        assert subtitle == "drawn by the plugin" and pic.size == (40, 30)
    finally:
        RENDERERS.pop(spec.name, None)
    assert renderer_for(spec) is KIND_RENDERERS[PIXEL]


# ============================================================================ fonts


def test_text_in_any_script_is_drawn_with_real_glyphs_falling_back_per_character():
    """An img2dataset alt-text with accents, a dash, CJK and emoji: every character whose glyph any installed font
    has is drawn with that font (its bitmap is not the font's .notdef box), one character at a time."""
    from PIL import ImageDraw

    from modalmill.jobs.show.canvas import _draw_text, _font
    from modalmill.jobs.show.fonts import NOTDEF, FontChain, font_files, fontconfig_file

    chain = _font(13)
    for ch in "naïve café — ☕ ÅØß":  # DejaVu Sans (this machine kind's system font) has all of them
        if not ch.isspace():
            assert chain.has(chain.font_for(ch), ch), ch
    assert not chain.missing
    # the drawn pixels of "ï" are not the box the font draws for a character it lacks
    def drawn(text, font):
        img = Image.new("L", (40, 30), 0)
        _draw_text(ImageDraw.Draw(img), (2, 2), text, 255, font)
        return np.asarray(img)
    first = chain.font_for("ï")
    assert drawn("ï", chain).any() and not np.array_equal(drawn("ï", chain), drawn(NOTDEF, first))
    # per character: DejaVu Sans Mono lacks the emoji, DejaVu Sans (next in the chain) has it
    sans = next(p for p in font_files() if p.endswith("DejaVuSans.ttf"))
    mono = os.path.join(os.path.dirname(sans), "DejaVuSansMono.ttf")
    two = FontChain(13, files=(mono, sans))
    assert [f.path for _, f in two.runs("ok 😀")] == [mono, sans]
    assert not two.has(two.fonts[0], "😀") and two.has(two.fonts[1], "😀")
    assert not np.array_equal(drawn("😀", two), drawn(NOTDEF, two.fonts[1]))
    # CJK: drawn with any installed font that has it (found through fontconfig), else said to be missing
    cjk = chain.font_for("中")
    if fontconfig_file("中"):
        assert chain.has(cjk, "中") and "中" not in chain.missing
    else:
        assert "中" in chain.missing  # no font on this machine has it: fonts-noto-cjk would
    res = render_values({"caption": ["naïve café ☕ 中文"]})
    assert res.panels[0].ok
