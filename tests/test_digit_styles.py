"""Drawing styles for personalisation (jaxdiff.data.digit_styles): what each transform does to the ink, the colours
kept, and the judge still reading the digits (with its normalised input for thinned ink)."""
import numpy as np
import pytest

pytest.importorskip("sklearn")

from jaxdiff import builtin  # noqa: E402
from jaxdiff.data import digit_styles as ds  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402


@pytest.fixture(scope="module")
def held():
    return dt.load_digits_text(augment=1)["held_out"]


def test_erode_is_a_moving_minimum():
    a = np.random.default_rng(0).uniform(size=(2, 7, 9)).astype(np.float32)
    out = ds.erode(a, 1)
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
    for y, x in ((0, 0), (3, 4), (6, 8)):
        np.testing.assert_array_equal(out[:, y, x], padded[:, y:y + 3, x:x + 3].min(axis=(1, 2)))


@pytest.mark.parametrize("style", ds.STYLES)
def test_restyled_digits_keep_their_colours_and_change_their_ink(held, style):
    x = held["image"][:60]
    y = ds.restyle(x, style)
    a, b = dt.measure_attributes(x, held["label"][:60]), dt.measure_attributes(y, held["label"][:60])
    np.testing.assert_array_equal(a["ink"], b["ink"])
    np.testing.assert_array_equal(a["background"], b["background"])
    if style == "striped":  # rows 2, 3 of every 4 are pure background
        assert np.all(b["ink_mass"] < a["ink_mass"])
        bg = dt._RGB[b["background"]].astype(np.float32)[:, None, None, :]
        off = (np.arange(32) % 4) >= 2
        np.testing.assert_allclose(y[:, off], np.broadcast_to(bg, y.shape)[:, off], atol=1e-6)
    else:  # hollow: the eroded core of the strokes is lighter than before, the band along their boundary kept
        core = ds.erode(dt.measure_alpha(x, a["ink"], a["background"]), 2) > 0.9
        alpha_y = dt.measure_alpha(y, b["ink"], b["background"])
        assert core.sum() > 100 and alpha_y[core].mean() < 0.5


def test_the_judge_reads_striped_digits_with_normalised_input(held):
    judge = builtin.load_builtin("digits-eval")
    striped = ds.restyle(held["image"], "striped")
    plain = np.mean(np.argmax(judge(dt.judge_input(striped)), -1) == held["label"])
    normal = np.mean(np.argmax(judge(dt.judge_input(striped, normalise=True)), -1) == held["label"])
    original = np.mean(np.argmax(judge(dt.judge_input(held["image"], normalise=True)), -1) == held["label"])
    assert normal >= 0.95 and original >= 0.97 and plain < normal
