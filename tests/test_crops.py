import numpy as np
import pytest

from modalmill.io.crops import CropConfig, make_crop_settings, validate_crop_settings


@pytest.mark.parametrize("hw", [(300, 451), (512, 512), (20, 10000), (1, 1), (7, 3)])
def test_crops_are_4m_crop_settings(hw):
    h, w = hw
    cfg = CropConfig(n_crops=6, scale_min=0.8)
    c = make_crop_settings("key", h, w, cfg, seed=0)
    assert c.shape == (6, 5) and c.dtype == np.int64
    side = min(h, w)
    assert c[0].tolist() == [(h - side) // 2, (w - side) // 2, side, side, 0]
    validate_crop_settings(c, h, w)


def test_random_crops_follow_scale_and_ratio():
    cfg = CropConfig(n_crops=400, scale_min=0.5)
    c = make_crop_settings("photo", 600, 800, cfg, seed=3)[1:]
    area = c[:, 2] * c[:, 3] / (600 * 800)
    ratio = c[:, 3] / c[:, 2]
    assert area.min() >= 0.49 and area.max() <= 1.0
    assert ratio.min() >= 0.74 and ratio.max() <= 1.34
    assert 0.35 < c[:, 4].mean() < 0.65  # flip with probability 0.5
    assert len({tuple(r) for r in c.tolist()}) > 350


def test_crops_depend_on_seed_and_key_only():
    cfg = CropConfig(n_crops=4)
    a = make_crop_settings("k1", 400, 600, cfg, seed=0)
    assert np.array_equal(a, make_crop_settings("k1", 400, 600, cfg, seed=0))
    assert not np.array_equal(a, make_crop_settings("k2", 400, 600, cfg, seed=0))
    assert not np.array_equal(a, make_crop_settings("k1", 400, 600, cfg, seed=1))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_crops"):
        CropConfig(n_crops=0)
    with pytest.raises(ValueError, match="outside"):
        validate_crop_settings(np.array([[0, 0, 10, 10, 0]]), 5, 5)
