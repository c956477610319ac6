"""Captioned colour digits (jaxdiff.data.digits_text): determinism, splits, captions, measurement."""
import re

import numpy as np
import pytest

pytest.importorskip("sklearn")

from jaxdiff.data import digits_text as dt  # noqa: E402
from jaxdiff.train import load_digits_dataset  # noqa: E402

AUGMENT = 2
FIELDS = ("image", "label", "ink", "background", "thickness", "slant", "caption", "source", "ink_mass", "shear")


@pytest.fixture(scope="module")
def sets():
    return dt.load_digits_text(seed=0, augment=AUGMENT)


def test_same_seed_same_sets_other_seed_other_colourings(sets):
    again = dt.load_digits_text(seed=0, augment=AUGMENT)
    other = dt.load_digits_text(seed=1, augment=AUGMENT)
    for split in sets:
        for f in FIELDS:
            np.testing.assert_array_equal(sets[split][f], again[split][f], err_msg=f"{split}/{f}")
    a, b = sets["train"], other["train"]
    for f in ("label", "source", "thickness", "slant"):  # the digits and their measured shape do not depend on the seed
        np.testing.assert_array_equal(a[f], b[f])
    assert (a["ink"] != b["ink"]).mean() > 0.5 and (a["caption"] != b["caption"]).mean() > 0.9


def test_shapes_ranges_and_sizes(sets):
    train, held, combos = sets["train"], sets["held_out"], sets["heldout_combinations"]
    _, judge_held = load_digits_dataset()
    want = sum(int((judge_held["label"] == d).sum()) for d, _ in dt.HELDOUT_COMBINATIONS)
    assert [len(s["label"]) for s in (train, held, combos)] == [1500 * AUGMENT, 297, want]
    for s in sets.values():
        assert s["image"].shape[1:] == (32, 32, 3) and s["image"].dtype == np.float32
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert all(len(s[f]) == len(s["label"]) for f in FIELDS)
        assert all(s[f].dtype == np.int32 for f in ("label", "ink", "background", "thickness", "slant", "source"))
        assert (s["ink"] != s["background"]).all()
        rgb = np.array([dt.PALETTE[c] for c in dt.COLOURS])
        assert (np.linalg.norm(rgb[s["ink"]] - rgb[s["background"]], axis=1) >= dt.MIN_CONTRAST).all()
    # each training digit in AUGMENT distinct colourings
    pairs = {(s, i, b) for s, i, b in zip(train["source"], train["ink"], train["background"])}
    assert len(pairs) == len(train["label"]) and np.bincount(train["source"]).tolist() == [AUGMENT] * 1500
    # per-class terciles: each bin a third of the training set
    assert np.bincount(train["thickness"]).tolist() == np.bincount(train["slant"]).tolist() == [500 * AUGMENT] * 3
    with pytest.raises(ValueError, match="augment"):
        dt.load_digits_text(augment=100)


def test_judge_held_out_digits_never_in_train(sets):
    judge_train, judge_held = load_digits_dataset()
    train = sets["train"]
    # every training image is a judge-training digit (its ink coverage, read back, is that digit's)...
    alpha = dt.measure_alpha(train["image"], train["ink"], train["background"])
    expect = dt.alpha_maps((judge_train["x"][..., 0] + 1) / 2)[train["source"]]
    np.testing.assert_allclose(alpha, expect, atol=1e-5)
    np.testing.assert_array_equal(train["label"], judge_train["label"][train["source"]])
    # ...and none is a held-out digit
    held_alpha = {np.round(a, 3).tobytes() for a in dt.alpha_maps((judge_held["x"][..., 0] + 1) / 2)}
    assert not any(np.round(a, 3).tobytes() in held_alpha for a in alpha)
    for split in ("held_out", "heldout_combinations"):
        np.testing.assert_array_equal(sets[split]["label"], judge_held["label"][sets[split]["source"]])


def test_heldout_combinations_never_in_train(sets):
    train, combos = sets["train"], sets["heldout_combinations"]
    held = {(d, dt.COLOURS.index(c)) for d, c in dt.HELDOUT_COMBINATIONS}
    assert not held & set(zip(train["label"].tolist(), train["ink"].tolist()))
    assert set(zip(combos["label"].tolist(), combos["ink"].tolist())) == held
    for d, c in held:  # the digit and the colour are each trained on, just not together
        assert ((train["label"] == d) & (train["ink"] != c)).any()
        assert ((train["ink"] == c) & (train["label"] != d)).any()


def test_captions_name_label_and_attributes(sets):
    for split, s in sets.items():
        for text, label, ink, bg, th, sl in zip(s["caption"], s["label"], s["ink"], s["background"],
                                                s["thickness"], s["slant"]):
            got = dt.parse_caption(str(text))
            assert (got["label"], got["ink"], got["background"]) == (label, dt.COLOURS[ink], dt.COLOURS[bg]), text
            assert got["thickness"] in (None, dt.THICKNESSES[th]) and got["slant"] in (None, dt.SLANTS[sl]), text
            if split != "train":  # evaluation captions are complete
                assert got["thickness"] is not None and got["slant"] is not None, text
    train = [dt.parse_caption(str(t)) for t in sets["train"]["caption"]]
    omitted = np.mean([c["thickness"] is None for c in train]), np.mean([c["slant"] is None for c in train])
    assert all(0.15 < o < 0.25 for o in omitted), omitted  # omit=0.2


def test_captions_vary_in_template_synonyms_and_digit_form(sets):
    captions = [str(c) for c in sets["train"]["caption"]]
    templates = {next(i for i, p in enumerate(dt._caption_patterns()) if p.match(c)) for c in captions}
    assert templates == set(range(len(dt.CAPTION_TEMPLATES)))
    words = set(" ".join(captions).replace(",", " ").split())
    assert {"thick", "bold", "heavy", "thin", "slender", "left-leaning", "upright", "seven", "7"} <= words
    assert len(set(captions)) > 0.8 * len(captions)
    # English articles: "an eight", "an 8", "an orange", "an upright", but "a one"
    text = "\n".join(captions)
    assert re.search(r"\ban (eight|8|orange|upright)\b", text) and re.search(r"\ba one\b", text)
    assert not re.search(r"\ba (eight|8|orange|upright)\b", text) and not re.search(r"\ban (one|1|red|thick)\b", text)


def test_parse_caption_reads_handwritten_prompts_and_refuses_others():
    assert dt.parse_caption("a thick red seven on a white background") == {
        "label": 7, "ink": "red", "background": "white", "thickness": "thick", "slant": None}
    assert dt.parse_caption("the digit 3, drawn in blue on yellow, thin strokes, leaning left") == {
        "label": 3, "ink": "blue", "background": "yellow", "thickness": "thin", "slant": "left"}
    with pytest.raises(ValueError, match="matches none"):
        dt.parse_caption("a photo of a cat")


def test_measured_attributes_recover_rendered(sets):
    for split, s in sets.items():
        m = dt.measure_attributes(s["image"], s["label"])
        for f in ("ink", "background"):
            assert (m[f] == s[f]).mean() >= 0.99, (split, f)
        for f in ("thickness", "slant"):  # same definition, read back from pixels
            np.testing.assert_array_equal(m[f], s[f], err_msg=f"{split}/{f}")
        np.testing.assert_allclose(m["ink_mass"], s["ink_mass"], atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dt.measure_attributes(sets["held_out"]["image"][:2] * 2 - 1, sets["held_out"]["label"][:2])
    with pytest.raises(ValueError, match="NHWC"):
        dt.measure_ink(sets["held_out"]["image"][0])


def test_measures_against_closed_form_images():
    # a 1-pixel line leaning right by 1 column every 4 rows: shear 1/4; covering half the canvas: mass 1/2
    a = np.zeros((1, 32, 32))
    a[0, np.arange(32), 4 + (31 - np.arange(32)) // 4] = 1
    assert dt.shear(a)[0] == pytest.approx(0.25, abs=0.01)
    assert dt.shear(a[:, :, ::-1])[0] == pytest.approx(-0.25, abs=0.01)  # mirrored: leans left
    half = np.zeros((1, 32, 32))
    half[0, :, :16] = 1
    assert dt.ink_mass(half)[0] == 0.5 and dt.shear(half)[0] == 0.0
    # compositing then measuring: colours and coverage come back
    img = dt.composite(a, np.array([dt.COLOURS.index("orange")]), np.array([dt.COLOURS.index("purple")]))
    assert img[0, 0, 0].tolist() == pytest.approx(dt.PALETTE["purple"])
    assert img[0, 31, 4].tolist() == pytest.approx(dt.PALETTE["orange"])
    assert dt.COLOURS[dt.measure_background(img)[0]] == "purple" and dt.COLOURS[dt.measure_ink(img)[0]] == "orange"


def test_upsampling_is_keys_cubic():
    # interior pixels (every tap inside the 8x8 image) agree with jax.image.resize's Keys cubic
    jax = pytest.importorskip("jax")
    x = np.random.default_rng(0).random((8, 8))
    w = dt._cubic_weights(8, 32)
    ref = np.asarray(jax.image.resize(x.astype(np.float32), (32, 32), "cubic", antialias=False))
    np.testing.assert_allclose((w @ x @ w.T)[6:26, 6:26], ref[6:26, 6:26], atol=1e-5)
    np.testing.assert_allclose(w.sum(1), 1.0)  # a constant image stays constant
    alpha = dt.alpha_maps(np.stack([0.5 * x, 0.25 * x]))  # below 1 after upsampling: no clipping
    np.testing.assert_allclose(alpha.max((1, 2)), 1.0)  # each digit's darkest pixel is pure ink
    np.testing.assert_allclose(alpha[0], alpha[1], atol=1e-6)


def test_judge_input_recovers_the_judges_digits(sets):
    """Back in the judge's 8x8 format, the held-out colour digits are the judge's own held-out digits (up to
    the bicubic smoothing), and the judge classifies them as well as the originals."""
    from jaxdiff import builtin

    _, judge_held = load_digits_dataset()
    held = sets["held_out"]
    x = dt.judge_input(held["image"])
    original = judge_held["x"][held["source"]]
    assert x.shape == original.shape == (297, 8, 8, 1) and x.min() >= -1 and x.max() <= 1
    assert np.abs(x - original).mean() < 0.15
    judge = builtin.load_builtin("digits-eval")
    acc = lambda a: float((np.argmax(np.asarray(judge(a)), -1) == held["label"]).mean())  # noqa: E731
    assert acc(x) >= acc(original) - 0.02 and acc(x) > 0.9
    with pytest.raises(ValueError, match="blocks"):
        dt.judge_input(held["image"][:, :30, :30])
