"""check_mask: every accepted layout, and the size error names the mask's real height and width."""
from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.pipelines.inpaint import check_mask


@pytest.mark.parametrize("shape", [(16, 8), (16, 8, 1), (1, 16, 8), (3, 16, 8), (1, 16, 8, 1), (3, 16, 8, 1)])
def test_accepted_layouts(shape):
    m = np.random.default_rng(0).random(shape).astype(np.float32)
    out = np.asarray(check_mask(m, 16, 8, 3))
    assert out.shape == (3, 16, 8, 1)
    flat = m.reshape(-1, 16, 8)
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(flat, (3, 16, 8)))


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1), (2, 64, 64), (1, 64, 64, 1)])
def test_wrong_size_reports_the_masks_size(shape):
    """A 64x64 mask for a 32x32 image (was "mask is 64x1" for the (H, W, 1) a grayscale file loads as)."""
    with pytest.raises(ValueError, match=r"mask is 64x64 but the image is 32x32"):
        check_mask(np.zeros(shape, np.float32), 32, 32, 2)
