"""Control images for spatial conditioning (ControlNet, T2I-Adapter), in pure, jit-able JAX.

- :func:`canny`: Canny edges (Canny 1986) following scikit-image's ``feature.canny`` step by step:
  Gaussian smoothing in its default ``mode="constant"`` (zero padding, then divided by the smoothed
  all-ones image, scikit-image's "bleed-over" correction), Sobel gradients (``scipy.ndimage.sobel``,
  ``mode="reflect"``), non-maximum suppression along the gradient direction with linear interpolation
  between the two neighbours it passes between (scikit-image's ``_nonmaximum_suppression_bilinear``,
  same comparisons), the one-pixel border dropped, then double thresholding with hysteresis.
  Hysteresis is computed by **iterated dilation**: the strong pixels (above ``high_threshold``) grow
  through the 8-connected weak pixels inside a ``jax.lax.while_loop`` until nothing changes, which keeps
  exactly the 8-connected components of the weak mask that hold a strong pixel (scikit-image labels the
  components with ``ndimage.label`` and keeps those same components).
- :func:`threshold_map`, :func:`scribble`: binary maps from a grayscale image (ControlNet's scribble
  models expect white strokes on black).
- :func:`control_image`: an edge or stroke map as the 3-channel NHWC image in [0, 1] that diffusers'
  ControlNet pipelines take (white on black).
- :func:`edge_agreement`: precision / recall / F1 of two edge maps with a pixel tolerance.
- :func:`digit_edges`: Canny edges of the measured ink coverage of :mod:`jaxdiff.data.digits_text` digits.

Images are (H, W), (B, H, W) or (B, H, W, C) with C in {1, 3, 4} (RGB is converted to gray with
scikit-image's ``rgb2gray`` weights, alpha dropped); float images are used as they are, integer images
are divided by their dtype's maximum (as scikit-image's ``img_as_float``, thresholds given for them too).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RGB_TO_GRAY = (0.2125, 0.7154, 0.0721)
"""scikit-image's ``rgb2gray`` weights (ITU-R BT.709 luma)."""

DIGIT_SIGMA, DIGIT_LOW, DIGIT_HIGH = 1.0, 0.4, 0.8
"""Canny settings of :func:`digit_edges` on 32x32 ink coverage (a full-contrast stroke edge has a Sobel
magnitude near 2, so these keep the stroke outlines and drop the faint ringing of the bicubic upsampling)."""


# ------------------------------------------------------------------------------------------ inputs

def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _gray(image: Any, name: str = "image") -> tuple[Array, bool, float]:
    """(B, H, W) float gray images, whether a batch axis was added, the divisor applied (dtype max; 1 for floats)."""
    x = image if isinstance(image, jax.Array) else np.asarray(image)
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, H, W, C), got shape {tuple(x.shape)}; "
                         "add a batch axis with x[None] for one (H, W, C) image")
    if x.ndim == 4 and x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must have 1, 3 or 4 channels in its last axis, got shape {tuple(x.shape)}")
    if min(x.shape[-3:-1] if x.ndim == 4 else x.shape[-2:]) < 3:
        raise ValueError(f"{name} must be at least 3x3 pixels, got shape {tuple(x.shape)}")
    dtype = np.dtype(x.dtype)
    dtype_max = 1.0
    if dtype == np.bool_:
        x = x.astype(jnp.float32)
    elif np.issubdtype(dtype, np.integer):
        dtype_max = float(np.iinfo(dtype).max)
        x = x.astype(jnp.float32) / dtype_max
    elif not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{name} must be a float, integer or bool array, got dtype {dtype}")
    elif _is_concrete(x) and not bool(np.isfinite(np.asarray(x)).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf); replace them, e.g. with jnp.nan_to_num")
    x = jnp.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(jnp.float32)
    if x.ndim == 4:
        c = x.shape[-1]
        # elementwise, not a dot product: a GPU matmul could round the weights to TF32
        x = x[..., 0] if c == 1 else sum(float(w) * x[..., k] for k, w in enumerate(RGB_TO_GRAY))
    added = x.ndim == 2
    return (x[None] if added else x), added, dtype_max


def _threshold(value: Any, default: float, dtype_max: float, batch: int, name: str) -> Array:
    """A threshold as a float32 leaf, scalar or one per image (B,), broadcast to (B, 1, 1)."""
    t = jnp.asarray(default if value is None else value, jnp.float32)
    if value is not None and dtype_max != 1.0:
        t = t / dtype_max
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))[:, None, None]
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or one value per image ({batch},), got shape {t.shape}")
    return t[:, None, None]


# ------------------------------------------------------------------------------------------ filters

def _shift_sum(x: Array, weights: np.ndarray, axis: int, mode: str) -> Array:
    """Correlate ``x`` with the odd-length 1-D ``weights`` along ``axis`` (centred, as ``scipy.ndimage.correlate1d``);
    ``mode`` is numpy's pad mode (``"constant"`` = zeros, ``"symmetric"`` = scipy's ``"reflect"``)."""
    r = len(weights) // 2
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    p = jnp.pad(x, pad, mode=mode)
    out = None
    for k, w in enumerate(weights):
        if w == 0:
            continue
        term = float(w) * jax.lax.slice_in_dim(p, k, k + n, axis=axis)
        out = term if out is None else out + term
    return out


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's 1-D Gaussian: ``exp(-x^2 / (2 sigma^2))`` for ``|x| <= int(truncate * sigma + 0.5)``, summing to 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return w / w.sum()


def _smooth(x: Array, sigma: float) -> Array:
    """scikit-image's Canny smoothing: zero-padded Gaussian divided by the Gaussian of ones (plus eps)."""
    w = gaussian_weights(sigma)

    def blur(a: Array) -> Array:
        return _shift_sum(_shift_sum(a, w, -2, "constant"), w, -1, "constant")

    bleed = blur(jnp.ones(x.shape[-2:], x.dtype)) + jnp.finfo(x.dtype).eps
    return blur(x) / bleed


def _sobel(x: Array) -> tuple[Array, Array]:
    """``scipy.ndimage.sobel`` along rows (axis 0 of an image) and columns (axis 1), ``mode="reflect"``."""
    d, s = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    isobel = _shift_sum(_shift_sum(x, d, -2, "symmetric"), s, -1, "symmetric")
    jsobel = _shift_sum(_shift_sum(x, d, -1, "symmetric"), s, -2, "symmetric")
    return isobel, jsobel


def _neighbour(m: Array, di: int, dj: int) -> Array:
    """``out[..., i, j] = m[..., i + di, j + dj]`` (zero outside; only border pixels read it, and they are dropped)."""
    p = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    h, w = m.shape[-2:]
    return p[..., 1 + di: 1 + di + h, 1 + dj: 1 + dj + w]


def _nonmaximum_suppression(isobel: Array, jsobel: Array, magnitude: Array, low: Array) -> Array:
    """``magnitude`` where it is a local maximum across the edge and ``>= low``, else 0 (scikit-image's
    ``_nonmaximum_suppression_bilinear``: same sectors, same interpolation weights, same ``<=`` tests)."""
    m = magnitude
    ai, aj = jnp.abs(isobel), jnp.abs(jsobel)
    nb = functools.partial(_neighbour, m)

    def ratio(num: Array, den: Array) -> Array:
        return num / jnp.where(den > 0, den, 1)

    # sector 1: both gradients positive or both non-positive (gradient along the main diagonal)
    cond1 = (isobel > 0) == (jsobel > 0)
    a = ai > aj
    w1 = jnp.where(a, ratio(aj, ai), ratio(ai, aj))
    n11_1, n12_1 = jnp.where(a, nb(1, 0), nb(0, 1)), nb(1, 1)
    n21_1, n22_1 = jnp.where(a, nb(-1, 0), nb(0, -1)), nb(-1, -1)
    # sector 2: opposite signs (gradient along the anti-diagonal)
    b = ai < aj
    w2 = jnp.where(b, ratio(ai, aj), ratio(aj, ai))
    n11_2, n12_2 = jnp.where(b, nb(0, 1), nb(-1, 0)), nb(-1, 1)
    n21_2, n22_2 = jnp.where(b, nb(0, -1), nb(1, 0)), nb(1, -1)

    w = jnp.where(cond1, w1, w2)
    n11, n12 = jnp.where(cond1, n11_1, n11_2), jnp.where(cond1, n12_1, n12_2)
    n21, n22 = jnp.where(cond1, n21_1, n21_2), jnp.where(cond1, n22_1, n22_2)
    c_plus = n12 * w + n11 * (1.0 - w) <= m
    c_minus = n22 * w + n21 * (1.0 - w) <= m

    h, wd = m.shape[-2:]
    rows, cols = jnp.arange(h)[:, None], jnp.arange(wd)[None, :]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < wd - 1)
    low = jnp.where(low == 0, jnp.asarray(1e-14, low.dtype), low)  # as scikit-image: m == 0 never passes
    keep = interior & (m >= low.astype(m.dtype)) & c_plus & c_minus
    return jnp.where(keep, m, 0)


def _dilate(mask: Array) -> Array:
    """3x3 (8-neighbour) binary dilation of a (..., H, W) bool mask, False outside."""
    p = jnp.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    r = p[..., :, :-2] | p[..., :, 1:-1] | p[..., :, 2:]
    return r[..., :-2, :] | r[..., 1:-1, :] | r[..., 2:, :]


def hysteresis(weak: Array, strong: Array, steps_per_check: int = 4) -> Array:
    """Pixels of ``weak`` 8-connected (through ``weak``) to a pixel of ``strong & weak``.

    Iterated dilation in a ``jax.lax.while_loop``: ``grown = weak & dilate(grown)``, ``steps_per_check``
    times per iteration, until an iteration changes nothing. Exactly the union of the 8-connected
    components of ``weak`` that contain a strong pixel, the components ``ndimage.label`` gives scikit-image.
    """
    def body(state: tuple[Array, Array]) -> tuple[Array, Array]:
        grown, _ = state
        new = grown
        for _ in range(steps_per_check):
            new = weak & _dilate(new)
        return new, jnp.any(new != grown)

    seed = weak & strong
    grown, _ = jax.lax.while_loop(lambda s: s[1], body, (seed, jnp.asarray(True)))
    return grown


@functools.partial(jax.jit, static_argnames=("sigma",))
def _canny_program(gray: Array, low: Array, high: Array, sigma: float) -> Array:
    smoothed = _smooth(gray, sigma)
    isobel, jsobel = _sobel(smoothed)
    magnitude = jnp.sqrt(isobel * isobel + jsobel * jsobel)
    kept = _nonmaximum_suppression(isobel, jsobel, magnitude, low)
    weak = kept > 0
    return hysteresis(weak, kept >= high.astype(kept.dtype))


# ------------------------------------------------------------------------------------------ public

def canny(image: Any, sigma: float = 1.0, low_threshold: Any = None, high_threshold: Any = None) -> Array:
    """Canny edges as bool (H, W) or (B, H, W), following ``skimage.feature.canny`` (module docstring).

    ``low_threshold`` / ``high_threshold`` (default 0.1 / 0.2, in image units; scalars or one per image)
    are traced leaves: new values reuse the compiled program; ``sigma`` is static (it sets the kernel size).
    jit- and vmap-able. Non-finite pixels and ``high < low`` are refused when the values are concrete.
    Against scikit-image 0.26 on its sample images (8 images x 2 settings, 128x128): 1 pixel of 262,144
    differs (``tests/test_control_images.py``); full-size ``camera`` is bit-identical.
    """
    gray, added, dtype_max = _gray(image)
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    b = gray.shape[0]
    low = _threshold(low_threshold, 0.1, dtype_max, b, "low_threshold")
    high = _threshold(high_threshold, 0.2, dtype_max, b, "high_threshold")
    if _is_concrete(low) and _is_concrete(high) and bool(np.any(np.asarray(high) < np.asarray(low))):
        raise ValueError(f"high_threshold ({high_threshold}) must be >= low_threshold ({low_threshold})")
    edges = _canny_program(gray, low, high, sigma=float(sigma))
    return edges[0] if added else edges


def threshold_map(image: Any, threshold: Any = 0.5, invert: bool = False) -> Array:
    """Float32 (H, W) / (B, H, W) map: 1.0 where the gray image is ``> threshold`` (``<`` with ``invert``), else 0.0.

    ``threshold`` (scalar or one per image, image units) is a traced leaf."""
    gray, added, dtype_max = _gray(image)
    t = _threshold(threshold, 0.5, dtype_max, gray.shape[0], "threshold").astype(gray.dtype)
    out = ((gray < t) if invert else (gray > t)).astype(jnp.float32)
    return out[0] if added else out


def scribble(image: Any, threshold: Any = 0.5, thickness: int = 1, dark_strokes: bool = True) -> Array:
    """Binary strokes (float32 0/1, 1 on strokes) from a drawing: pixels darker than ``threshold``
    (lighter with ``dark_strokes=False``), thickened by ``thickness - 1`` 3x3 dilations. Strokes come out
    white on black, the convention of ControlNet's scribble models (their annotator inverts dark-on-white
    sketches the same way)."""
    if int(thickness) < 1:
        raise ValueError(f"thickness must be >= 1 pixel, got {thickness}")
    strokes = threshold_map(image, threshold, invert=dark_strokes) > 0
    for _ in range(int(thickness) - 1):
        strokes = _dilate(strokes)
    return strokes.astype(jnp.float32)


def control_image(edges: Any) -> Array:
    """An edge / stroke map (H, W), (B, H, W) or (B, H, W, 1), bool or float, as the float32 NHWC
    (B, H, W, 3) control image in [0, 1] diffusers' ControlNet pipelines take (white marks on black;
    diffusers' control image processor does not normalise to [-1, 1]). An unbatched map gets a batch of one."""
    e = edges if isinstance(edges, jax.Array) else np.asarray(edges)
    if e.ndim == 4 and e.shape[-1] == 1:
        e = e[..., 0]
    if e.ndim not in (2, 3):
        raise ValueError(f"edges must be (H, W), (B, H, W) or (B, H, W, 1), got shape {tuple(e.shape)}")
    e = jnp.clip(jnp.asarray(e).astype(jnp.float32), 0.0, 1.0)
    e = e[None] if e.ndim == 2 else e
    return jnp.repeat(e[..., None], 3, axis=-1)


def edge_agreement(pred: Any, target: Any, tolerance: int = 1) -> dict[str, Array]:
    """Precision, recall and F1 of edge map ``pred`` against ``target`` (bool (H, W) or (B, H, W)), a pixel
    counting as matched when the other map has an edge within ``tolerance`` pixels in Chebyshev distance
    (``tolerance`` 3x3 dilations; 1 = the 8-neighbourhood). Per image; an empty ``pred`` has precision 1,
    an empty ``target`` recall 1, F1 = 2PR / (P + R) (0 when both are 0)."""
    p, t = jnp.asarray(pred).astype(bool), jnp.asarray(target).astype(bool)
    if p.shape != t.shape or p.ndim not in (2, 3):
        raise ValueError(f"pred and target must both be (H, W) or (B, H, W) of one shape, got {p.shape} and {t.shape}")
    near_p, near_t = p, t
    for _ in range(int(tolerance)):
        near_p, near_t = _dilate(near_p), _dilate(near_t)
    axes = (-2, -1)
    n_p, n_t = p.sum(axes), t.sum(axes)
    precision = jnp.where(n_p > 0, (p & near_t).sum(axes) / jnp.maximum(n_p, 1), 1.0)
    recall = jnp.where(n_t > 0, (t & near_p).sum(axes) / jnp.maximum(n_t, 1), 1.0)
    f1 = jnp.where(precision + recall > 0, 2 * precision * recall / jnp.maximum(precision + recall, 1e-12), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def digit_edges(images: Any, sigma: float = DIGIT_SIGMA, low_threshold: float = DIGIT_LOW,
                high_threshold: float = DIGIT_HIGH) -> Array:
    """Canny edges (N, 32, 32) bool of coloured digits (N, 32, 32, 3) in [0, 1] (:mod:`jaxdiff.data.digits_text`):
    the ink coverage is measured from the pixels (``measure_background``, ``measure_ink``,
    ``measure_alpha``, so every colour pair gives the same edges) and :func:`canny` runs on it.
    ``control_image(digit_edges(x))`` is the ControlNet control image of issue 12."""
    from jaxdiff.data import digits_text as dt

    x = np.asarray(images, np.float64)
    bg = dt.measure_background(x)  # checks (N, H, W, 3) in [0, 1]
    alpha = dt.measure_alpha(x, dt.measure_ink(x, bg), bg).astype(np.float32)
    return canny(alpha, sigma, low_threshold, high_threshold)
