"""Palette's degradations are what they say: one box, one half, Gaussian blur (against scipy), noise, Pillow JPEG."""
import numpy as np
import pytest
from scipy import fft, ndimage

from jaxdiff.data import degradations as D
from jaxdiff.train import load_digits_dataset


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()[1]["x"][:64]


def test_box_mask_is_one_rectangle_with_sides_in_range():
    rng = np.random.default_rng(0)
    masks = D.box_mask(rng, 200, 8, 8, 3, 5)
    seen = set()
    for m in masks[..., 0]:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        h, w = len(rows), len(cols)
        assert 3 <= h <= 5 and 3 <= w <= 5
        assert rows[-1] - rows[0] == h - 1 and cols[-1] - cols[0] == w - 1  # contiguous
        assert m.sum() == h * w  # filled: a rectangle
        seen.add((rows[0], cols[0]))
    assert len(seen) > 10  # positions vary


def test_half_mask_masks_exactly_the_named_half():
    m = D.half_mask(["left", "right", "top", "bottom"], 8, 6)[..., 0]
    assert all(x.sum() == 24 for x in m)
    assert m[0, :, :3].all() and not m[0, :, 3:].any()
    assert m[1, :, 3:].all() and not m[1, :, :3].any()
    assert m[2, :4].all() and not m[2, 4:].any()
    assert m[3, 4:].all() and not m[3, :4].any()
    with pytest.raises(ValueError, match="unknown side"):
        D.half_mask("middle", 8, 8)


def test_fill_keeps_known_pixels_and_puts_standard_noise_in_the_hole(digits):
    x = np.repeat(digits, 20, axis=0)
    mask = D.half_mask(["left"] * len(x), 8, 8)
    src = D.fill_masked(x, mask, np.random.default_rng(0))
    known = mask[..., 0] == 0
    np.testing.assert_array_equal(src[..., 0][known], x[..., 0][known])
    hole = src[..., 0][~known]
    assert abs(hole.mean()) < 0.03 and abs(hole.std() - 1.0) < 0.03
    const = D.fill_masked(x, mask, np.random.default_rng(0), "constant", -1.0)
    assert np.all(const[..., 0][~known] == -1.0)


@pytest.mark.parametrize("sigma", [0.6, 1.2])
def test_gaussian_blur_equals_scipy(digits, sigma):
    ours = D.gaussian_blur(digits, sigma)
    ref = ndimage.gaussian_filter(digits.astype(np.float64), (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_blur_noise_adds_noise_of_the_given_std(digits):
    rng = np.random.default_rng(1)
    out = D.blur_noise(digits, rng, 0.8, 0.3)
    resid = out - D.gaussian_blur(digits, 0.8)
    assert abs(resid.std() - 0.3) < 0.02 and abs(resid.mean()) < 0.02


def test_jpeg_is_lossy_at_low_quality_and_drops_high_frequencies(digits):
    low, high = D.jpeg(digits, 5), D.jpeg(digits, 95)
    u8 = np.round((low + 1.0) * 127.5)
    np.testing.assert_allclose(u8, np.round(u8), atol=1e-4)  # decoded 8-bit values
    err = lambda a: np.abs(a - digits).mean()  # noqa: E731
    assert err(high) < 0.05 < err(low)
    # one 8x8 block: quantisation zeroes most DCT coefficients of the (level-shifted) image, more at lower quality
    def significant(a):
        return (np.abs(fft.dctn(D.to_uint8(a)[..., 0].astype(np.float64) - 128, axes=(1, 2), norm="ortho")) > 20).sum()
    assert significant(low) < 0.6 * significant(digits) and significant(low) < significant(D.jpeg(digits, 20))


def test_task_pairs_cover_every_task_and_keep_targets(digits):
    pairs = D.task_pairs(digits, 4, seed=0)
    assert pairs["x"].shape == pairs["source"].shape == (256, 8, 8, 1)
    assert set(np.unique(pairs["task"])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(pairs["x"][:64], digits)
    inpaint = pairs["task"] == 0
    restore = pairs["task"] >= 2
    assert np.all(pairs["mask"][inpaint].sum((1, 2, 3)) >= 9) and np.all(pairs["mask"][restore] == 1)
    with pytest.raises(ValueError, match="unknown task"):
        D.degrade(digits, "colourise", np.random.default_rng(0))
