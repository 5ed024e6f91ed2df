"""modalmill.io.decode: bytes of one image file -> the stored rgb JPEG and its pixels."""

import io
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from modalmill.io.decode import DecodeConfig, DecodedImage, DecodeError, decode_image, decode_stored_rgb
from tests import badimages as bi
from tests.badimages import BAD_CASES, CASES, EXPECTED, OK_CASES

BLACK = (0, 0, 0)


def near(pixel, colour, tol=12):
    return np.abs(np.asarray(pixel, int) - np.asarray(colour, int)).max() <= tol


def quadrant_colours(img: np.ndarray):
    h, w = img.shape[:2]
    ys, xs = (h // 4, 3 * h // 4), (w // 4, 3 * w // 4)
    return [img[y, x] for y in ys for x in xs]  # TL, TR, BL, BR


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------------------ every case


@pytest.mark.filterwarnings("error")  # no case may leak a Pillow warning (bomb, palette, EXIF...)
@pytest.mark.parametrize("name", list(CASES))
def test_case_outcome(name):
    data, expected = CASES[name](), EXPECTED[name]
    if expected != "ok":
        with pytest.raises(DecodeError) as err:
            decode_image(data)
        reason = err.value.reason
        assert reason.startswith(expected), reason
        assert "\n" not in reason and len(reason) < 300 and str(err.value) == reason
        return
    d = decode_image(data)
    assert isinstance(d, DecodedImage) and d.source_format == data_format(data)
    assert d.image.dtype == np.uint8 and d.image.ndim == 3 and d.image.shape[2] == 3
    h, w = d.image.shape[:2]
    assert (w, h) == d.original_size  # no max_size: never resized
    assert d.stored_bytes[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(d.stored_bytes)) as stored:
        assert stored.format == "JPEG" and stored.mode == "RGB" and stored.size == (w, h)
    # labels are computed from exactly what is stored
    assert np.array_equal(d.image, decode_stored_rgb(d.stored_bytes))
    # deterministic: same bytes in, same bytes and pixels out
    again = decode_image(data)
    assert again.stored_bytes == d.stored_bytes and np.array_equal(again.image, d.image)
    assert again.reencoded == d.reencoded and again.original_size == d.original_size
    if not d.reencoded:
        assert d.stored_bytes == data and d.source_format == "JPEG"


def data_format(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return im.format


def test_cases_table_is_complete():
    assert set(CASES) == set(EXPECTED) == set(OK_CASES) | set(BAD_CASES)
    assert all(CASES[n].expected == EXPECTED[n] for n in CASES)
    for name in ["truncated_jpeg", "empty_file", "random_bytes", "gradient16_png", "cmyk_jpeg",
                 "palette_transparent_png", "exif_rot6_jpeg", "exif_rot8_jpeg", "exif_rot3_jpeg", "animated_gif",
                 "one_pixel_png", "wide_png", "bomb_png", "grayscale_jpeg", "la_png", "bilevel_png", "photo_webp",
                 "photo_bmp", "photo_tiff", "real_photo_jpeg"]:
        assert name in CASES
    assert all(isinstance(CASES[n](), bytes) for n in CASES)


def test_decoding_is_thread_safe_and_changes_no_global_state():
    filters, max_pixels, truncated = list(warnings.filters), Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES

    def outcome(name):
        try:
            d = decode_image(CASES[name]())
            return d.stored_bytes, d.image.tobytes()
        except DecodeError as e:
            return e.reason

    serial = {n: outcome(n) for n in CASES}
    with ThreadPoolExecutor(8) as pool:
        threaded = dict(zip(list(CASES) * 3, pool.map(outcome, list(CASES) * 3)))
    assert threaded == serial
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == max_pixels
    assert ImageFile.LOAD_TRUNCATED_IMAGES is truncated is False


# ------------------------------------------------------------------------------------------------ content


@pytest.mark.parametrize("name", ["exif_rot6_jpeg", "exif_rot8_jpeg", "exif_rot3_jpeg", "exif_rot1_jpeg",
                                  "exif_rot6_png"])
def test_exif_orientation_gives_an_upright_image(name):
    d = decode_image(CASES[name]())
    assert d.original_size == (bi.UPRIGHT_W, bi.UPRIGHT_H) and d.image.shape == (bi.UPRIGHT_H, bi.UPRIGHT_W, 3)
    for got, want in zip(quadrant_colours(d.image), [bi.RED, bi.GREEN, bi.BLUE, bi.WHITE]):
        assert near(got, want), (got, want)
    assert near(d.image[0, 0], bi.RED)  # the top row starts red
    assert d.reencoded == (name != "exif_rot1_jpeg")
    with Image.open(io.BytesIO(d.stored_bytes)) as stored:  # a stored re-encode carries no orientation to re-apply
        assert stored.getexif().get(0x0112, 1) == 1


def test_exif_rotation_with_resize():
    d = decode_image(bi.exif_rot6_jpeg(), DecodeConfig(max_size=32))
    assert d.original_size == (64, 48) and d.image.shape == (24, 32, 3)
    for got, want in zip(quadrant_colours(d.image), [bi.RED, bi.GREEN, bi.BLUE, bi.WHITE]):
        assert near(got, want, tol=20), (got, want)


@pytest.mark.parametrize("name", ["animated_gif", "animated_png", "animated_webp"])
def test_animated_gives_the_first_frame(name):
    img = decode_image(CASES[name]()).image
    assert img.shape == (16, 24, 3)
    assert np.abs(img.astype(int) - bi.RED).max() <= 8  # red, not the blue second frame


@pytest.mark.parametrize("name", ["gradient16_png", "gradient16b_tiff"])
def test_16bit_gradient_stays_a_gradient(name):
    img = decode_image(CASES[name]()).image.astype(int)
    row = img[8, :, 0]
    assert np.abs(row - np.arange(256)).max() <= 4, row  # x*257 -> x: scaled, not clipped to white
    assert img[..., 0].std() > 60 and (img[..., 0] == img[..., 2]).mean() > 0.95


def test_float_image_is_normalised_by_min_max():
    img = decode_image(bi.float_tiff()).image.astype(int)
    assert np.abs(img[8, :, 1] - np.linspace(0, 255, 256)).max() <= 4
    assert np.all(decode_image(bi.flat_float_tiff()).image == 100)


def test_cmyk_jpeg_colours():
    img = decode_image(bi.cmyk_jpeg()).image
    assert near(img[16, 8], bi.RED, 16) and near(img[16, 56], bi.BLUE, 16)


def test_transparency_is_composited_on_the_background():
    white = decode_image(bi.palette_transparent_png()).image
    assert near(white[8, 4], bi.WHITE) and near(white[8, 28], bi.RED)
    green_bg = (0, 128, 0)
    cfg = DecodeConfig(background=green_bg)
    img = decode_image(bi.palette_transparent_png(), cfg).image
    assert near(img[8, 4], green_bg) and near(img[8, 28], bi.RED)
    img = decode_image(bi.rgba_png(), cfg).image
    assert near(img[8, 4], green_bg) and near(img[8, 28], (0, 64, 127))  # half-transparent blue over green
    img = decode_image(bi.la_png(), cfg).image
    assert near(img[8, 4], green_bg) and near(img[8, 28], (100, 100, 100))
    assert near(decode_image(bi.rgba_png()).image[8, 28], (127, 127, 255))


def test_palette_bilevel_and_grayscale():
    img = decode_image(bi.palette_png()).image
    assert near(img[8, 4], bi.GREEN) and near(img[8, 28], bi.BLUE)
    img = decode_image(bi.bilevel_png()).image
    assert near(img[8, 4], BLACK, 2) and near(img[8, 28], bi.WHITE, 2)
    d = decode_image(bi.grayscale_jpeg())
    assert d.reencoded and d.image.shape == (128, 160, 3)
    assert np.abs(d.image.astype(int) - d.image[..., :1]).max() <= 2  # still grey, now 3 channels
    assert np.abs(d.image[..., 0].astype(int) - pil_rgb(bi.grayscale_jpeg())[..., 0]).mean() < 2


@pytest.mark.parametrize("name", ["photo_webp", "photo_bmp", "photo_tiff", "ycbcr_tiff", "photo_ppm"])
def test_other_formats_match_pillow(name):
    d = decode_image(CASES[name]())
    ref = pil_rgb(CASES[name]()).astype(int)
    assert d.reencoded and d.image.shape == ref.shape
    assert np.abs(d.image.astype(int) - ref).mean() < 3  # only the q95 JPEG re-encode in between


def test_rare_modes_convert_to_rgb():
    from modalmill.io.decode import _to_rgb

    bg = (255, 255, 255)
    base = Image.new("RGB", (4, 2), (200, 30, 60))
    for mode in ["HSV", "YCbCr", "CMYK", "LAB", "RGBX", "RGBa"]:
        converted = base.convert("RGBA").convert("RGBa") if mode == "RGBa" else base.convert(mode)
        out = _to_rgb(converted, bg)
        assert out.mode == "RGB" and near(out.getpixel((0, 0)), (200, 30, 60), 4), mode
    la = Image.new("LA", (2, 1), (100, 128)).convert("La")  # premultiplied: Pillow cannot convert it
    assert near(_to_rgb(la, (0, 0, 0)).getpixel((0, 0)), (50, 50, 50), 2)
    i16b = Image.frombytes("I;16B", (3, 1), np.array([0, 257 * 100, 65535], ">u2").tobytes())
    assert [p[0] for p in np.asarray(_to_rgb(i16b, bg))[0]] == [0, 100, 255]
    wide = Image.fromarray(np.array([[0, 257 * 7, 65535]], np.int32))  # 32-bit "I" holding 16-bit samples
    assert wide.mode == "I" and [p[0] for p in np.asarray(_to_rgb(wide, bg))[0]] == [0, 7, 255]
    narrow = Image.fromarray(np.array([[0, 7, 200]], np.int32))  # "I" holding 8-bit samples
    assert [p[0] for p in np.asarray(_to_rgb(narrow, bg))[0]] == [0, 7, 200]
    signed = Image.fromarray(np.array([[-1000, 0, 1000]], np.int32))
    assert [p[0] for p in np.asarray(_to_rgb(signed, bg))[0]] == [0, 128, 255]
    nan = Image.fromarray(np.array([[np.nan, 0.0, 1.0]], np.float32))
    assert [p[0] for p in np.asarray(_to_rgb(nan, bg))[0]] == [0, 0, 255]


# ------------------------------------------------------------------------------------------------ storing


@pytest.mark.parametrize("name", ["real_photo_jpeg", "progressive_jpeg", "big_photo_jpeg", "exif_rot1_jpeg"])
def test_rgb_jpeg_needing_nothing_is_stored_unchanged(name):
    data = CASES[name]()
    d = decode_image(data)
    assert d.reencoded is False and d.stored_bytes == data and d.source_format == "JPEG"
    assert np.array_equal(d.image, pil_rgb(data))


def test_passthrough_also_when_max_size_is_not_exceeded():
    d = decode_image(bi.real_photo_jpeg(), DecodeConfig(max_size=512))  # longer side == max_size
    assert d.reencoded is False and d.image.shape == (512, 512, 3)


def test_reencode_uses_jpeg_quality():
    lo = decode_image(bi.photo_bmp(), DecodeConfig(jpeg_quality=50))
    hi = decode_image(bi.photo_bmp(), DecodeConfig(jpeg_quality=98))
    assert len(lo.stored_bytes) < len(hi.stored_bytes)
    ref = pil_rgb(bi.photo_bmp()).astype(int)
    assert np.abs(hi.image - ref).mean() < np.abs(lo.image - ref).mean()


def test_resize_decodes_a_jpeg_at_reduced_scale(monkeypatch):
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    d = decode_image(bi.big_photo_jpeg(), DecodeConfig(max_size=512))
    assert d.image.shape == (384, 512, 3) and d.original_size == (2048, 1536) and d.reencoded
    assert drafts == [((512, 384), (512, 384))]  # decoded at 1/4 scale: exactly the target, no resize needed
    d = decode_image(bi.big_photo_jpeg(), DecodeConfig(max_size=700))
    assert d.image.shape == (525, 700, 3) and d.original_size == (2048, 1536)
    assert drafts[-1] == ((700, 525), (1024, 768))  # 1/2 scale (>= target), then Lanczos to 700x525
    # close to a full-resolution decode + Lanczos
    with Image.open(io.BytesIO(bi.big_photo_jpeg())) as im:
        ref = np.asarray(im.resize((700, 525), Image.Resampling.LANCZOS)).astype(float)
    psnr = 10 * np.log10(255**2 / ((d.image - ref) ** 2).mean())
    assert psnr > 30, psnr


def test_resize_keeps_aspect_and_never_upscales():
    d = decode_image(bi.wide_png(), DecodeConfig(max_size=512))
    assert d.image.shape == (1, 512, 3) and d.original_size == (10000, 20)
    d = decode_image(bi.progressive_jpeg(), DecodeConfig(max_size=100))  # 300x200
    assert d.image.shape == (67, 100, 3) and d.original_size == (300, 200) and d.reencoded
    d = decode_image(bi.one_pixel_png(), DecodeConfig(max_size=512))
    assert d.image.shape == (1, 1, 3)
    tall = decode_image(bi.exif_rot6_png(), DecodeConfig(max_size=16))  # upright 64x48
    assert tall.image.shape == (12, 16, 3)


# ------------------------------------------------------------------------------------------------ limits


def _forbid_pixel_decoding(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


@pytest.mark.parametrize("name", ["bomb_png", "bomb_gif", "bomb_jpeg"])
def test_bomb_is_rejected_from_the_header(name, monkeypatch):
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(DecodeError, match="^decompression bomb: ") as err:
        decode_image(CASES[name]())
    assert "pixels > limit 1.8e8" in err.value.reason


def test_bomb_reason_and_configured_limit(monkeypatch):
    with pytest.raises(DecodeError) as err:
        decode_image(bi.bomb_png())
    assert err.value.reason == "decompression bomb: 100000x100000 = 1e10 pixels > limit 1.8e8"
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(DecodeError) as err:
        decode_image(bi.photo_bmp(), DecodeConfig(max_pixels=10_000))  # 128x96
    assert err.value.reason == "decompression bomb: 128x96 = 1.2e4 pixels > limit 1e4"


def test_min_size():
    with pytest.raises(DecodeError, match=r"^too small: 1x1 \(shorter side 1 < min_size 2\)$"):
        decode_image(bi.one_pixel_png(), DecodeConfig(min_size=2))
    with pytest.raises(DecodeError, match="^too small: 10000x20"):
        decode_image(bi.wide_png(), DecodeConfig(min_size=32))
    assert decode_image(bi.wide_png(), DecodeConfig(min_size=20)).image.shape == (20, 10000, 3)


def test_only_decode_errors_for_junk():
    rng = np.random.default_rng(0)
    photo = bi.real_photo_jpeg()
    junk = [b"\x00", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00", b"BM"]
    junk += [photo[:n] for n in (3, 20, 200, 2000)]
    for _ in range(20):  # overwrite bytes across a real JPEG and a real TIFF
        for src in (photo, bi.photo_tiff()):
            b = np.frombuffer(src, np.uint8).copy()
            b[rng.integers(0, len(b), 8)] = rng.integers(0, 256, 8, dtype=np.uint8)
            junk.append(b.tobytes())
    for data in junk:
        try:
            d = decode_image(data)
        except DecodeError as e:
            assert e.reason and "\n" not in e.reason
        else:
            assert np.array_equal(d.image, decode_stored_rgb(d.stored_bytes))
    with pytest.raises(DecodeError, match="expected bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]
    assert decode_image(bytearray(photo)).stored_bytes == photo


def test_decode_stored_rgb_errors():
    with pytest.raises(DecodeError, match=r"^empty file \(0 bytes\)$"):
        decode_stored_rgb(b"")
    with pytest.raises(DecodeError, match="^not a JPEG"):
        decode_stored_rgb(bi.one_pixel_png())
    with pytest.raises(DecodeError, match="^truncated JPEG"):
        decode_stored_rgb(bi.truncated_jpeg())
    with pytest.raises(DecodeError, match="^decompression bomb"):
        decode_stored_rgb(bi.bomb_jpeg())
    img = decode_stored_rgb(bi.real_photo_jpeg())
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8


def test_config_is_validated():
    assert DecodeConfig(background=[1, 2, 3]).background == (1, 2, 3)
    for bad in [{"jpeg_quality": 0}, {"jpeg_quality": 101}, {"max_size": 0}, {"max_pixels": 0},
                {"min_size": 0}, {"background": (0, 0)}, {"background": (0, 0, 256)}, {"max_size": True}]:
        with pytest.raises(ValueError):
            DecodeConfig(**bad)


def test_decode_error_pickles():
    e = pickle.loads(pickle.dumps(DecodeError("truncated JPEG: x")))
    assert isinstance(e, DecodeError) and e.reason == "truncated JPEG: x"
