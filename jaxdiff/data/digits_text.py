"""Captioned, coloured digits: scikit-learn's 8x8 digits at 32x32 RGB, for a small text-to-image model.

Each image is a digit's intensity map (the *alpha*, :func:`alpha_maps`) composited in an ink colour over
a background colour from :data:`PALETTE`. Its caption names the label, both colours and two attributes
*measured* from the alpha, each binned into terciles of its own digit class over the training split:

- **thickness** (``thin`` / ``regular`` / ``thick``) from :func:`ink_mass`, the mean alpha;
- **slant** (``left`` / ``upright`` / ``right``) from :func:`shear`, the moment skew ``-mu11 / mu02``.

Per-class terciles because both raw measures depend on the digit's shape (a 1 has less ink than an 8,
a 7's top bar makes it lean right and a 6's loop left: with fixed thresholds no 7 would ever be
"left-leaning"), so "thick" means thicker than most training digits of that class.
:func:`attribute_thresholds` holds the tercile edges; :func:`measure_attributes` reads every attribute
back from pixels (used to judge generated images). :func:`load_digits_text` builds the three sets.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

IMAGE_SIZE = 32

PALETTE: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.62, 0.18),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.98, 0.86, 0.10),
    "purple": (0.56, 0.16, 0.72),
    "orange": (1.00, 0.55, 0.05),
}
"""Colour name -> RGB in [0, 1]; indices into :data:`COLOURS` are the integer colour codes."""
COLOURS: tuple[str, ...] = tuple(PALETTE)
_RGB = np.array([PALETTE[c] for c in COLOURS], np.float64)

MIN_CONTRAST = 0.6
"""Ink and background must be at least this far apart in RGB (Euclidean): rules out red/orange,
blue/purple and yellow/orange, leaving 50 ordered pairs."""
COLOUR_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (i, b) for i in range(len(COLOURS)) for b in range(len(COLOURS))
    if i != b and np.linalg.norm(_RGB[i] - _RGB[b]) >= MIN_CONTRAST)
"""Allowed (ink, background) colour codes."""

HELDOUT_COMBINATIONS: tuple[tuple[int, str], ...] = (
    (0, "blue"), (2, "orange"), (4, "purple"), (6, "green"), (8, "red"))
"""(digit, ink colour) pairs never drawn for training, on any background: composition is measured on them."""

THICKNESSES = ("thin", "regular", "thick")
SLANTS = ("left", "upright", "right")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption wording. Synonyms are chosen at random; "[...]" marks an optional part holding one attribute
# (left out of a training caption with probability ``omit``); "{a}" is "a" or "an" for the next word.
THICKNESS_WORDS = {"thin": ("thin", "slender", "fine"), "regular": ("regular", "medium", "medium-weight"),
                   "thick": ("thick", "bold", "heavy")}
SLANT_ADJECTIVES = {"left": ("left-leaning", "left-slanted"), "upright": ("upright", "straight"),
                    "right": ("right-leaning", "right-slanted")}
SLANT_PHRASES = {"left": ("leaning left", "slanted to the left", "tilted left"),
                 "upright": ("upright", "standing straight", "not slanted"),
                 "right": ("leaning right", "slanted to the right", "tilted right")}
CAPTION_TEMPLATES = (
    "{a} [{thick} ][{slant_adj} ]{ink} {digit} on {a} {bg} background",
    "the digit {digit}, drawn in {ink} on {bg}[, {thick} strokes][, {slant}]",
    "{a} {ink} {digit} on {a} {bg} background[, {thick} strokes][, {slant}]",
    "{a} {bg} background with {a} [{thick} ]{ink} {digit}[ {slant}]",
    "handwritten {digit} in {ink} ink on {bg}[, {slant}][, {thick} strokes]",
    "{ink} on {bg}: {a} [{slant_adj} ]{digit}[ with {thick} strokes]",
    "{a} [{slant_adj} ][{thick} ]{digit} written in {ink} over {a} {bg} background",
    "number {digit}[, {thick},] in {ink} on {bg}[, {slant}]",
)


# ----------------------------------------------------------------------------------------- rendering

def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of Keys' cubic convolution (a = -0.5; Keys 1981), half-pixel centres, edges replicated."""
    def keys(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        return np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1, np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))

    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        c = (o + 0.5) * n_in / n_out - 0.5
        for j in range(int(np.floor(c)) - 1, int(np.floor(c)) + 3):
            m[o, min(max(j, 0), n_in - 1)] += keys(c - j)
    return m


def alpha_maps(intensity: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Ink coverage (N, size, size) float32 in [0, 1] of digit intensities (N, h, w) in [0, 1].

    Bicubic upsampling (:func:`_cubic_weights`), clipped to [0, 1], then divided by each image's maximum
    so that every digit's darkest pixel is pure ink.
    """
    x = np.asarray(intensity, np.float64)
    if x.ndim != 3:
        raise ValueError(f"intensity must be (N, h, w), got shape {x.shape}; drop the channel axis with x[..., 0]")
    rows, cols = _cubic_weights(x.shape[1], size), _cubic_weights(x.shape[2], size)
    up = np.clip(np.einsum("ih,nhw,jw->nij", rows, x, cols), 0, 1)
    return (up / np.maximum(up.max((1, 2), keepdims=True), 1e-12)).astype(np.float32)


def composite(alpha: np.ndarray, ink: np.ndarray, background: np.ndarray) -> np.ndarray:
    """RGB images (N, H, W, 3) float32: ``bg * (1 - alpha) + ink * alpha`` (Porter-Duff "over", opaque
    background) for colour codes ``ink``, ``background`` (N,)."""
    a = np.asarray(alpha, np.float32)[..., None]
    ink_rgb = _RGB[np.asarray(ink)].astype(np.float32)[:, None, None, :]
    bg_rgb = _RGB[np.asarray(background)].astype(np.float32)[:, None, None, :]
    return bg_rgb * (1 - a) + ink_rgb * a


def ink_mass(alpha: np.ndarray) -> np.ndarray:
    """Mean ink coverage of each image (N,): the fraction of the canvas covered, partial pixels counted fractionally."""
    return np.asarray(alpha, np.float64).mean((1, 2))


def shear(alpha: np.ndarray) -> np.ndarray:
    """Slant of each image (N,) from its second moments: ``-mu11 / mu02``, the horizontal shift per row
    going up (x right, y down), i.e. tan of the lean from vertical; > 0 leans right.

    The skew estimate of moment-based slant normalisation of handwritten digits (e.g. Liu et al.,
    "Handwritten digit recognition: benchmarking of state-of-the-art techniques", Pattern Recognit. 2003).
    """
    a = np.asarray(alpha, np.float64)
    w = a / np.maximum(a.sum((1, 2), keepdims=True), 1e-12)
    ys, xs = np.mgrid[:a.shape[1], :a.shape[2]]
    dx = xs - (w * xs).sum((1, 2))[:, None, None]
    dy = ys - (w * ys).sum((1, 2))[:, None, None]
    return -(w * dx * dy).sum((1, 2)) / np.maximum((w * dy * dy).sum((1, 2)), 1e-12)


def _judge_split() -> tuple[dict, dict]:
    """The digits-eval judge's split (``jaxdiff.train.load_digits_dataset``, seed 0) as intensities in [0, 1]."""
    from jaxdiff.train.data import load_digits_dataset

    train, held = load_digits_dataset()
    return ({"x": (train["x"][..., 0] + 1) / 2, "label": train["label"]},
            {"x": (held["x"][..., 0] + 1) / 2, "label": held["label"]})


def _tercile_edges(values: np.ndarray) -> np.ndarray:
    """Two edges splitting ``values`` into thirds, each halfway between neighbouring sorted values."""
    v, n = np.sort(values), len(values)
    return np.array([(v[k - 1] + v[k]) / 2 for k in (round(n / 3), round(2 * n / 3))])


@functools.lru_cache(maxsize=1)
def attribute_thresholds() -> dict[str, np.ndarray]:
    """Per-class tercile edges ``{"ink_mass": (10, 2), "shear": (10, 2)}`` over the judge's training split
    (1,500 digits, :func:`alpha_maps` at 32x32): below the first edge is thin / left, from the second on
    thick / right."""
    train, _ = _judge_split()
    alpha = alpha_maps(train["x"])
    out = {}
    for name, values in (("ink_mass", ink_mass(alpha)), ("shear", shear(alpha))):
        edges = np.stack([_tercile_edges(values[train["label"] == k]) for k in range(10)])
        edges.flags.writeable = False
        out[name] = edges
    return out


def _bins(values: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return ((values >= edges[labels, 0]).astype(np.int32) + (values >= edges[labels, 1])).astype(np.int32)


# ------------------------------------------------------------------------------------------ captions

def _vowel_sound(word: str) -> bool:
    return (word[0] in "aeiou8") and not word.startswith("one")


def caption(label: int, ink: str, background: str, thickness: str, slant: str, rng: np.random.Generator,
            omit: float = 0.0) -> str:
    """A caption in one of :data:`CAPTION_TEMPLATES`, synonyms and digit form (word or numeral) drawn from
    ``rng``; thickness and slant are each left out with probability ``omit``. Reads back with :func:`parse_caption`."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    words = {"{digit}": DIGIT_WORDS[label] if rng.random() < 0.5 else str(label),
             "{thick}": str(rng.choice(THICKNESS_WORDS[thickness])),
             "{slant_adj}": str(rng.choice(SLANT_ADJECTIVES[slant])),
             "{slant}": str(rng.choice(SLANT_PHRASES[slant])),
             "{ink}": ink, "{bg}": background}
    keep_thick, keep_slant = rng.random() >= omit, rng.random() >= omit

    def optional(m: re.Match) -> str:
        return m[1] if (keep_thick if "{thick}" in m[1] else keep_slant) else ""

    text = re.sub(r"\[([^\]]*)\]", optional, template)
    for slot, word in words.items():
        text = text.replace(slot, word)
    return re.sub(r"\{a\} (\S+)", lambda m: ("an " if _vowel_sound(m[1]) else "a ") + m[1], text)


def _alternation(group: str, table: dict[str, tuple[str, ...]]) -> str:
    words = sorted({w for ws in table.values() for w in ws}, key=len, reverse=True)
    return f"(?P<{group}>" + "|".join(re.escape(w) for w in words) + ")"


@functools.lru_cache(maxsize=1)
def _caption_patterns() -> tuple[re.Pattern, ...]:
    colours = "|".join(COLOURS)
    slots = {"{a}": "an?", "{digit}": "(?P<digit>" + "|".join(DIGIT_WORDS + tuple("0123456789")) + ")",
             "{ink}": f"(?P<ink>{colours})", "{bg}": f"(?P<bg>{colours})",
             "{thick}": _alternation("thick", THICKNESS_WORDS), "{slant}": _alternation("slant", SLANT_PHRASES),
             "{slant_adj}": _alternation("slant", SLANT_ADJECTIVES), "[": "(?:", "]": ")?"}
    patterns = []
    for template in CAPTION_TEMPLATES:
        parts = re.split(r"(\{\w+\}|\[|\])", template)
        patterns.append(re.compile("^" + "".join(slots.get(p, re.escape(p)) for p in parts) + "$"))
    return tuple(patterns)


def parse_caption(text: str) -> dict[str, Any]:
    """Attributes named by a caption of :data:`CAPTION_TEMPLATES`: ``{"label": int, "ink": str,
    "background": str, "thickness": str | None, "slant": str | None}`` (None where left out)."""
    def lookup(word: str | None, table: dict[str, tuple[str, ...]]) -> str | None:
        return None if word is None else next(k for k, ws in table.items() if word in ws)

    found = []
    for template, pattern in zip(CAPTION_TEMPLATES, _caption_patterns()):
        m = pattern.match(text)
        if m is None:
            continue
        d = m.groupdict()
        slant_table = SLANT_PHRASES if "{slant}" in template else SLANT_ADJECTIVES
        found.append({"label": DIGIT_WORDS.index(d["digit"]) if d["digit"] in DIGIT_WORDS else int(d["digit"]),
                      "ink": d["ink"], "background": d["bg"], "thickness": lookup(d["thick"], THICKNESS_WORDS),
                      "slant": lookup(d["slant"], slant_table)})
    if not found:
        raise ValueError(f"caption {text!r} matches none of CAPTION_TEMPLATES; build captions with caption()")
    if any(f != found[0] for f in found):
        raise ValueError(f"caption {text!r} reads two ways: {found}")
    return found[0]


# --------------------------------------------------------------------------------------- measurement

def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be RGB NHWC (N, H, W, 3), got shape {x.shape}; add a batch axis with x[None]")
    if x.min() < -0.25 or x.max() > 1.25:
        raise ValueError(f"images must be RGB in [0, 1], got values in [{x.min():.2f}, {x.max():.2f}]; "
                         "map [-1, 1] outputs with (x + 1) / 2")
    return x


def _nearest_colour(rgb: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    d = np.linalg.norm(rgb[:, None, :] - _RGB[None], axis=-1)
    if exclude is not None:
        d[np.arange(len(d)), exclude] = np.inf
    return d.argmin(1).astype(np.int32)


def measure_background(images: np.ndarray, border: int = 2) -> np.ndarray:
    """Background colour codes (N,): the palette colour nearest the per-channel median of the
    ``border``-pixel frame (digits rarely reach the frame, so the median is background)."""
    x = _check_images(images)
    frame = np.ones(x.shape[1:3], bool)
    frame[border:-border, border:-border] = False
    return _nearest_colour(np.median(x[:, frame], axis=1))


def measure_ink(images: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Ink colour codes (N,): the palette colour ``c`` (other than the background ``b``) whose segment
    ``b + a (c - b)``, ``0 <= a <= 1``, passes closest (mean squared distance) to the pixels far from the
    background, those at least half the 99th-percentile distance from it. A segment, not the nearest
    colour to their mean, because partly covered pixels are blends that can sit nearer another colour.
    """
    x = _check_images(images)
    bg = measure_background(x) if background is None else np.asarray(background)
    pixels = x.reshape(len(x), -1, 3) - _RGB[bg][:, None, :]
    d = np.linalg.norm(pixels, axis=-1)
    far = (d >= 0.5 * np.quantile(d, 0.99, axis=1, keepdims=True)).astype(np.float64)
    cost = np.empty((len(x), len(COLOURS)))
    for c in range(len(COLOURS)):
        e = _RGB[c][None, :] - _RGB[bg]  # (N, 3)
        a = np.clip(np.einsum("npc,nc->np", pixels, e) / np.maximum((e * e).sum(-1), 1e-12)[:, None], 0, 1)
        r = ((pixels - a[..., None] * e[:, None, :]) ** 2).sum(-1)
        cost[:, c] = (r * far).sum(1) / np.maximum(far.sum(1), 1)
    cost[np.arange(len(x)), bg] = np.inf
    return cost.argmin(1).astype(np.int32)


def measure_alpha(images: np.ndarray, ink: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Ink coverage (N, H, W) in [0, 1]: each pixel projected onto the background -> ink segment of the
    given palette colours (inverts :func:`composite` exactly when the colours are right)."""
    x = _check_images(images)
    bg, e = _RGB[np.asarray(background)], _RGB[np.asarray(ink)] - _RGB[np.asarray(background)]
    a = np.einsum("nhwc,nc->nhw", x - bg[:, None, None, :], e) / (e * e).sum(-1)[:, None, None]
    return np.clip(a, 0, 1)


def measure_attributes(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every attribute read back from RGB images (N, H, W, 3) in [0, 1] of digits ``labels`` (N,):
    ``ink``, ``background`` (colour codes), ``thickness``, ``slant`` (codes into :data:`THICKNESSES`,
    :data:`SLANTS`, by the per-class terciles of :func:`attribute_thresholds`), ``ink_mass``, ``shear``."""
    bg = measure_background(images)
    ink = measure_ink(images, bg)
    alpha = measure_alpha(images, ink, bg)
    mass, sh, edges = ink_mass(alpha), shear(alpha), attribute_thresholds()
    return {"ink": ink, "background": bg, "thickness": _bins(mass, labels, edges["ink_mass"]),
            "slant": _bins(sh, labels, edges["shear"]), "ink_mass": mass.astype(np.float32),
            "shear": sh.astype(np.float32)}


def judge_input(images: np.ndarray, size: int = 8, normalise: bool = False) -> np.ndarray:
    """RGB digits (N, H, W, 3) in [0, 1] in the ``digits-eval`` judge's format: (N, size, size, 1) in [-1, 1].

    The colours are measured (:func:`measure_background`, :func:`measure_ink`), the ink coverage
    (:func:`measure_alpha`) is averaged over ``H/size x W/size`` blocks (the area average that undoes the
    upsampling of :func:`alpha_maps` up to its smoothing) and mapped from [0, 1] to [-1, 1] as the judge's
    scikit-learn intensities 0..16 are. ``normalise`` divides each image's blocks by their maximum first, so
    digits drawn with thinned ink (the ``striped`` style of :mod:`jaxdiff.data.digit_styles`) read as solid ones.
    """
    x = _check_images(images)
    n, h, w, _ = x.shape
    if h % size or w % size:
        raise ValueError(f"images of {h}x{w} do not split into {size}x{size} blocks; resize them to a multiple of {size}")
    bg = measure_background(x)
    alpha = measure_alpha(x, measure_ink(x, bg), bg)
    pooled = alpha.reshape(n, size, h // size, size, w // size).mean((2, 4))
    if normalise:
        pooled = pooled / np.maximum(pooled.max(axis=(1, 2), keepdims=True), 1e-6)
    return (2.0 * pooled - 1.0).astype(np.float32)[..., None]


# ------------------------------------------------------------------------------------------ data set

def _render_set(alpha: np.ndarray, labels: np.ndarray, rows: list[tuple[int, int, int, str]]) -> dict[str, np.ndarray]:
    source = np.array([r[0] for r in rows], np.int32)
    ink, bg = np.array([r[1] for r in rows], np.int32), np.array([r[2] for r in rows], np.int32)
    a, label = alpha[source], labels[source].astype(np.int32)
    mass, sh, edges = ink_mass(a), shear(a), attribute_thresholds()
    return {"image": composite(a, ink, bg), "label": label, "ink": ink, "background": bg,
            "thickness": _bins(mass, label, edges["ink_mass"]), "slant": _bins(sh, label, edges["shear"]),
            "caption": np.array([r[3] for r in rows]), "source": source,
            "ink_mass": mass.astype(np.float32), "shear": sh.astype(np.float32)}


def _captioned(rows: list, source: int, label: int, pairs: list, rng: np.random.Generator,
               mass_bin: int, slant_bin: int, omit: float) -> None:
    for ink, bg in pairs:
        rows.append((source, ink, bg, caption(label, COLOURS[ink], COLOURS[bg], THICKNESSES[mass_bin],
                                              SLANTS[slant_bin], rng, omit)))


def load_digits_text(seed: int = 0, augment: int = 4, omit: float = 0.2) -> dict[str, dict[str, np.ndarray]]:
    """The captioned colour digits: ``{"train", "held_out", "heldout_combinations"}``, each a dict of
    aligned arrays ``image`` (N, 32, 32, 3) float32 in [0, 1], ``label``, ``ink``, ``background``,
    ``thickness``, ``slant`` (int32 codes), ``caption`` (str), ``source`` (index into the judge's split),
    ``ink_mass``, ``shear`` (float32). A pure function of its arguments.

    - ``train``: the judge's 1,500 training digits (``jaxdiff.train.load_digits_dataset``, seed 0), each
      in ``augment`` distinct (ink, background) pairs from :data:`COLOUR_PAIRS`, never one of
      :data:`HELDOUT_COMBINATIONS`; thickness and slant each left out of a caption with probability ``omit``.
    - ``held_out``: the judge's 297 held-out digits, one colouring each (any pair), full captions.
    - ``heldout_combinations``: every held-out digit of each held-out (digit, ink) pair in that ink,
      on a random background, full captions.

    Colourings and captions of source ``i`` come from ``numpy.random.default_rng([seed, split, i, ...])``.
    """
    train_src, held_src = _judge_split()
    banned = {(d, COLOURS.index(c)) for d, c in HELDOUT_COMBINATIONS}
    most = min(sum((d, i) not in banned for i, _ in COLOUR_PAIRS) for d in range(10))
    if not 1 <= augment <= most:
        raise ValueError(f"augment must be between 1 and {most} (distinct colourings per digit), got {augment}")
    sets = {}
    for split, src in (("train", train_src), ("held_out", held_src)):
        alpha = alpha_maps(src["x"])
        edges = attribute_thresholds()
        mbin = _bins(ink_mass(alpha), src["label"], edges["ink_mass"])
        sbin = _bins(shear(alpha), src["label"], edges["shear"])
        rows: list = []
        for i, label in enumerate(src["label"].tolist()):
            if split == "train":
                rng = np.random.default_rng([seed, 0, i])
                allowed = [p for p in COLOUR_PAIRS if (label, p[0]) not in banned]
                pairs = [allowed[k] for k in rng.choice(len(allowed), augment, replace=False)]
                _captioned(rows, i, label, pairs, rng, mbin[i], sbin[i], omit)
            else:
                rng = np.random.default_rng([seed, 1, i])
                _captioned(rows, i, label, [COLOUR_PAIRS[rng.integers(len(COLOUR_PAIRS))]], rng, mbin[i], sbin[i], 0.0)
        sets[split] = _render_set(alpha, src["label"], rows)
        if split == "held_out":
            rows = []
            for digit, colour in HELDOUT_COMBINATIONS:
                ink = COLOURS.index(colour)
                bgs = [b for i, b in COLOUR_PAIRS if i == ink]
                for i in np.flatnonzero(held_src["label"] == digit).tolist():
                    rng = np.random.default_rng([seed, 2, i, ink])
                    _captioned(rows, i, digit, [(ink, bgs[rng.integers(len(bgs))])], rng, mbin[i], sbin[i], 0.0)
            sets["heldout_combinations"] = _render_set(alpha, src["label"], rows)
    return sets
