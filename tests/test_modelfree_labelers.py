"""The model-free labelers: generic contract tests over every one in the registry, and specific expectations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from modalmill.labelers import LABELERS, LabelFailure, LabelInput, get_labeler
from modalmill.schemas.modalities import METADATA_RANGES, get_modality

# Every model-free labeler that modalmill itself registers (test-only labelers registered by other test
# modules, and derived labelers that need other modalities' labels, are left out: the generic inputs here
# carry only an image; and imported ground truth, which serves what `modalmill import` resolved: see
# tests/test_own_labels.py). Sorted by name so the test ids are stable whatever the import order.
MODEL_FREE = sorted((c for c in LABELERS.values()
                     if not c.stateful and not c.requires and c.__module__.startswith("modalmill.")
                     and c.__module__ != "modalmill.labelers.imported"),
                    key=lambda c: c.name)


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)())


def _inp(image: np.ndarray, key: str = "k", original_size: tuple[int, int] | None = None) -> LabelInput:
    h, w = image.shape[:2]
    return LabelInput(key=key, image=image, original_size=original_size or (w * 2, h * 2),
                      crops=np.array([[0, 0, min(h, w), min(h, w), 0]], dtype=np.int64))


def _flat(h: int, w: int, rgb) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rgb
    return img


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


EDGE_CASES = {
    "1x1": lambda: _flat(1, 1, (12, 200, 99)),
    "1x500": lambda: _noise(1, 500, 1),
    "500x1": lambda: _noise(500, 1, 2),
    "flat": lambda: _flat(40, 60, (90, 90, 90)),
    "noise": lambda: _noise(80, 120, 3),
    "chelsea": lambda: _skimage("chelsea"),
}


def _encode_all(cls, results, images) -> list[dict[str, bytes]]:
    out = []
    for res, img in zip(results, images):
        assert isinstance(res, dict), f"{cls.name}: expected a label dict, got {res!r}"
        assert set(res) == set(cls.outputs), f"{cls.name}: outputs {sorted(res)} != declared {cls.outputs}"
        out.append({m: get_modality(m).encode(v, "k", image_hw=img.shape[:2]) for m, v in res.items()})
    return out


def test_the_model_free_labelers_are_registered():
    names = {c.name for c in MODEL_FREE}
    assert {"canny_edge", "color_palette", "metadata"} <= names
    for name in ("canny_edge", "color_palette", "metadata"):
        cls = get_labeler(name)
        assert name in cls.outputs and cls.description and not cls.stateful
        assert cls.default_resources.num_cpus == 1 and cls.default_resources.num_gpus == 0


# ---------------------------------------------------------------------- generic contract


@pytest.mark.parametrize("cls", MODEL_FREE, ids=lambda c: c.name)
def test_contract_on_edge_case_images(cls):
    """One valid result per input in order, each output encodes at the image geometry; deterministic."""
    images = [make() for make in EDGE_CASES.values()]
    lab = cls()
    lab.setup()
    assert lab.process_batch([]) == []
    results = lab.process_batch([_inp(img, f"s{i}") for i, img in enumerate(images)])
    assert len(results) == len(images)
    first = _encode_all(cls, results, images)

    # a fresh instance, the batch reversed: byte-identical per sample
    again = cls()
    again.setup()
    rev = again.process_batch([_inp(img, f"s{i}") for i, img in reversed(list(enumerate(images)))])
    second = _encode_all(cls, rev[::-1], images)
    assert first == second
    # one at a time (batch composition does not matter)
    for img, enc in zip(images, first):
        assert _encode_all(cls, lab.process_batch([_inp(img)]), [img])[0] == enc
    # the config hash is stable and the config round-trips through make_config
    assert cls(lab.config_dict()).config_hash() == lab.config_hash()


@pytest.mark.parametrize("cls", MODEL_FREE, ids=lambda c: c.name)
@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
def test_contract_on_real_photos(cls, photo):
    img = _skimage(photo)
    lab = cls()
    lab.setup()
    (res,) = lab.process_batch([_inp(img)])
    enc = _encode_all(cls, [res], [img])[0]
    (res2,) = cls().process_batch([_inp(img.copy())])
    assert _encode_all(cls, [res2], [img])[0] == enc


@pytest.mark.parametrize("cls", [get_labeler(n) for n in ("canny_edge", "color_palette", "metadata")],
                         ids=lambda c: c.name)
def test_bad_images_fail_the_sample_not_the_batch(cls):
    good = _noise(20, 30)
    bad = [good.astype(np.float32), good[..., 0], np.zeros((0, 5, 3), np.uint8), good[..., :2]]
    results = cls().process_batch([_inp(good, "g0")] + [
        LabelInput(key=f"b{i}", image=b, original_size=(30, 20), crops=np.zeros((1, 5), np.int64))
        for i, b in enumerate(bad)] + [_inp(good, "g1")])
    assert isinstance(results[0], dict) and isinstance(results[-1], dict)
    assert all(isinstance(r, LabelFailure) and r.reason for r in results[1:-1])


def test_config_validation():
    with pytest.raises(ValueError, match="aperture_size"):
        get_labeler("canny_edge").make_config({"aperture_size": 4})
    with pytest.raises(ValueError, match="low_threshold"):
        get_labeler("canny_edge").make_config({"low_threshold": 250, "high_threshold": 100})
    with pytest.raises(ValueError, match="max_side"):
        get_labeler("color_palette").make_config({"max_side": 0})
    with pytest.raises(ValueError, match="unknown setting"):
        get_labeler("metadata").make_config({"nope": 1})


# ---------------------------------------------------------------------- canny_edge


def _square(size: int = 100, lo: int = 30, hi: int = 70) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def test_canny_finds_the_border_of_a_white_square():
    img = _square()
    (res,) = get_labeler("canny_edge")().process_batch([_inp(img)])
    edges = res["canny_edge"]
    assert edges.shape == (100, 100) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    # distance of each edge pixel to the square's border (the boundary lies between pixels 29|30 and 69|70)
    inside = (ys >= 29) & (ys <= 70) & (xs >= 29) & (xs <= 70)
    near_border = (np.minimum.reduce([np.abs(ys - 29.5), np.abs(ys - 69.5), np.abs(xs - 29.5),
                                      np.abs(xs - 69.5)]) <= 1.5)
    assert inside.all() and near_border.all()
    # and the border is found all around: every side has edge pixels along most of its length
    for side in (edges[28:32, 30:70], edges[68:72, 30:70], edges[30:70, 28:32].T, edges[30:70, 68:72].T):
        assert (side.max(axis=0) == 255).mean() > 0.9


@pytest.mark.parametrize("config", [{}, {"auto": True}, {"blur_sigma": 2.0}, {"aperture_size": 7}])
def test_canny_finds_no_edges_on_a_flat_image(config):
    (res,) = get_labeler("canny_edge")(config).process_batch([_inp(_flat(50, 70, (120, 60, 200)))])
    assert res["canny_edge"].shape == (50, 70) and not res["canny_edge"].any()


@pytest.mark.parametrize("name,config", [
    ("canny_edge", {"auto": True}), ("canny_edge", {"blur_sigma": 2.5}),
    ("canny_edge", {"aperture_size": 5, "l2_gradient": True}),
    ("color_palette", {"max_side": 8, "n_init": 1}), ("metadata", {"decimals": 0}),
], ids=["canny-auto", "canny-blur", "canny-aperture5", "palette-small", "metadata-decimals0"])
def test_non_default_settings_on_edge_case_images(name, config):
    cls = get_labeler(name)
    lab = cls(config)
    images = [make() for make in EDGE_CASES.values()]
    first = _encode_all(cls, lab.process_batch([_inp(img) for img in images]), images)
    assert first == _encode_all(cls, cls(config).process_batch([_inp(img) for img in images]), images)


def test_canny_settings_change_the_result():
    img = _skimage("astronaut")
    lab = get_labeler("canny_edge")
    (base,) = lab().process_batch([_inp(img)])
    (blur,) = lab({"blur_sigma": 2.5}).process_batch([_inp(img)])
    (low,) = lab({"low_threshold": 30, "high_threshold": 60}).process_batch([_inp(img)])
    (auto,) = lab({"auto": True}).process_batch([_inp(img)])
    n = {k: int((r["canny_edge"] > 0).sum()) for k, r in [("base", base), ("blur", blur), ("low", low),
                                                             ("auto", auto)]}
    assert 0 < n["blur"] < n["base"] < n["low"]
    assert n["auto"] > 0
    # the stored map is exactly OpenCV's Canny on the BT.601 grey image
    import cv2

    want = cv2.Canny(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 100, 200, apertureSize=3)
    assert np.array_equal(base["canny_edge"], want)


# ---------------------------------------------------------------------- color_palette


def _palette(img: np.ndarray, config=None) -> dict[str, list[int]]:
    (res,) = get_labeler("color_palette")(config).process_batch([_inp(img)])
    value = res["color_palette"]
    assert isinstance(value, list) and len(value) == 1
    return value[0]


def _triples(flat: list[int]) -> list[tuple[int, int, int]]:
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def test_palette_of_two_flat_halves():
    a, b = (200, 30, 40), (20, 120, 220)
    img = np.empty((90, 150, 3), np.uint8)
    img[:, :100] = a  # two thirds of the image
    img[:, 100:] = b
    pal = _palette(img)
    assert sorted(pal, key=int) == [str(k) for k in range(1, 8)]
    two = _triples(pal["2"])
    assert np.abs(np.subtract(two[0], a)).max() <= 2 and np.abs(np.subtract(two[1], b)).max() <= 2
    # k = 1: the mean colour (2/3 a + 1/3 b)
    mean = (np.array(a) * 2 + np.array(b)) / 3
    assert np.abs(np.subtract(_triples(pal["1"])[0], mean)).max() <= 2
    # more clusters than colours: k triples drawn from the two colours, the bigger first
    for k in range(3, 8):
        t = _triples(pal[str(k)])
        assert len(t) == k and t[0] == a and set(t) == {a, b}
    # b first once it covers the bigger area
    assert _triples(_palette(img[:, 70:])["2"])[0] == b


def test_palette_orders_colours_by_area():
    colours = [(250, 250, 250), (10, 200, 10), (30, 30, 160)]
    img = np.empty((64, 64, 3), np.uint8)
    img[:, :36] = colours[0]
    img[:, 36:56] = colours[1]
    img[:, 56:] = colours[2]
    rng = np.random.default_rng(0)  # a little noise so k-means has real work to do
    img = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    three = _triples(_palette(img)["3"])
    for got, want in zip(three, colours):
        assert np.abs(np.subtract(got, want)).max() <= 2


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 1), (30, 30)])
def test_palette_of_a_flat_image_repeats_its_colour(shape):
    pal = _palette(_flat(*shape, (17, 140, 255)))
    for k in range(1, 8):
        assert pal[str(k)] == [17, 140, 255] * k


def test_palette_of_a_photo_is_deterministic_and_sane():
    img = _skimage("chelsea")
    p1, p2 = _palette(img), _palette(img.copy())
    assert p1 == p2
    for k in range(1, 8):
        t = _triples(p1[str(k)])
        assert len(t) == k and all(0 <= c <= 255 for tr in t for c in tr)
    # k = 1 is close to the mean colour of the image
    assert np.abs(np.subtract(_triples(p1["1"])[0], img.reshape(-1, 3).mean(0))).max() <= 3
    # a different seed may give a different local optimum but the same layout and validity
    get_modality("color_palette").encode([_palette(img, {"seed": 7})], "k")


# ---------------------------------------------------------------------- metadata


def _meta(img: np.ndarray, original_size=None) -> dict:
    (res,) = get_labeler("metadata")().process_batch([_inp(img, original_size=original_size)])
    meta = res["metadata"]
    json.dumps(meta, allow_nan=False)
    return meta


NAMES = {"original_width", "original_height", "brightness", "contrast", "saturation", "colorfulness", "entropy"}


@pytest.mark.parametrize("rgb", [(0, 0, 0), (255, 255, 255), (10, 200, 30), (123, 45, 67), (90, 90, 90)])
def test_metadata_of_a_flat_image(rgb):
    meta = _meta(_flat(20, 30, rgb), original_size=(640, 427))
    assert set(meta) == NAMES
    r, g, b = rgb
    assert meta["brightness"] == pytest.approx(0.299 * r + 0.587 * g + 0.114 * b, abs=1e-4)
    assert meta["contrast"] == 0 and meta["entropy"] == 0
    mx, mn = max(rgb), min(rgb)
    assert meta["saturation"] == pytest.approx(255 * (mx - mn) / mx if mx else 0, abs=1e-4)
    # Hasler-Süsstrunk of a flat image: no spread, 0.3 * |mean opponent colour|
    rg, yb = r - g, 0.5 * (r + g) - b
    assert meta["colorfulness"] == pytest.approx(min(150, 0.3 * math.hypot(rg, yb)), abs=1e-4)
    assert (meta["original_width"], meta["original_height"]) == (640, 427)
    assert isinstance(meta["original_width"], int) and isinstance(meta["original_height"], int)
    for name in NAMES - {"original_width", "original_height"}:
        assert isinstance(meta[name], float) and math.copysign(1, meta[name]) == 1  # no -0.0


def test_metadata_of_a_half_black_half_white_image():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 10:] = 255
    meta = _meta(img)
    assert meta["brightness"] == pytest.approx(127.5)
    assert meta["contrast"] == 127  # 127.5, clipped into 4M's range
    assert meta["entropy"] == pytest.approx(1.0)
    assert meta["saturation"] == 0 and meta["colorfulness"] == 0


def test_metadata_entropy_of_four_equal_grey_levels_is_two_bits():
    img = np.repeat(np.array([0, 60, 120, 250], np.uint8), 25)[None, :, None].repeat(3, axis=2)
    assert _meta(np.ascontiguousarray(img))["entropy"] == pytest.approx(2.0)


@pytest.mark.parametrize("photo", ["chelsea", "astronaut"])
def test_metadata_colorfulness_of_a_photo_exceeds_its_greyscale(photo):
    img = _skimage(photo)
    grey = img.mean(axis=2, dtype=np.float64).round().astype(np.uint8)[..., None].repeat(3, axis=2)
    colour, mono = _meta(img), _meta(grey)
    assert mono["colorfulness"] == 0 and mono["saturation"] == 0
    assert colour["colorfulness"] > 10 and colour["saturation"] > 10
    for meta in (colour, mono):
        assert 0 < meta["entropy"] <= 8 and 0 < meta["contrast"] < 127 and 0 < meta["brightness"] < 255
        for name, v in meta.items():
            lo, hi = METADATA_RANGES[name]
            assert lo <= v <= hi and round(v, 4) == v


def test_metadata_clips_colorfulness_into_4m_range():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, :5] = (255, 0, 0)
    img[:, 5:] = (0, 255, 255)  # extreme opponent colours: Hasler-Süsstrunk > 150
    assert _meta(img)["colorfulness"] == 150


def test_metadata_original_size_passes_through_and_bad_sizes_fail():
    img = _noise(10, 20)
    assert {k: _meta(img, (4032, 3024))[k] for k in ("original_width", "original_height")} == {
        "original_width": 4032, "original_height": 3024}
    assert _meta(img, (np.int64(7), np.int32(9)))["original_width"] == 7
    lab = get_labeler("metadata")()
    for size in [(0, 10), (10, -1), (1.5, 2), None, (3,)]:
        (res,) = lab.process_batch([LabelInput(key="k", image=img, original_size=size, crops=np.zeros((1, 5)))])
        assert isinstance(res, LabelFailure) and "original_size" in res.reason
