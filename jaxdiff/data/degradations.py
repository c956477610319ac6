"""Image degradations for image-to-image diffusion (Palette, Saharia et al. 2022, "Palette: Image-to-Image
Diffusion Models", SIGGRAPH 2022), on NHWC float images in [-1, 1] (NumPy, deterministic in a ``Generator``).

- inpainting: a random axis-aligned box (:func:`box_mask`); uncropping: one half of the image
  (:func:`half_mask`). Palette fills the masked region of the source with standard Gaussian noise
  (:func:`fill_masked`; ``fill="constant"`` fills a constant instead);
- restoration: Gaussian blur plus Gaussian noise (:func:`blur_noise`), or JPEG compression at low quality
  through Pillow (:func:`jpeg`), as Palette's JPEG restoration task (quality 5-30).

:func:`degrade` applies one named task; :func:`task_pairs` draws a multi-task training set, the task of
each pair chosen at random and implied only by the source (one model for every task, as Palette's
multi-task model). Masks are 1 where the image is missing (to be generated), 0 where it is known.
"""
from __future__ import annotations

import io

import numpy as np

TASKS = ("inpaint", "uncrop", "blur_noise", "jpeg")
"""The degradations :func:`degrade` knows (``jaxdiff sample --task restore`` covers the last two)."""
SIDES = ("left", "right", "top", "bottom")
FILLS = ("noise", "constant")


def _check(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be NHWC (N, H, W, C) in [-1, 1], got shape {x.shape}")
    return x


def box_mask(rng: np.random.Generator, n: int, height: int, width: int, min_side: int = 3,
             max_side: int = 5) -> np.ndarray:
    """``(n, height, width, 1)`` masks, each one axis-aligned box of ones with sides drawn in
    ``[min_side, max_side]`` at a uniformly random position inside the image."""
    if not 1 <= min_side <= max_side <= min(height, width):
        raise ValueError(f"box sides must satisfy 1 <= min_side <= max_side <= {min(height, width)}, "
                         f"got {min_side}, {max_side}")
    out = np.zeros((n, height, width, 1), np.float32)
    hs = rng.integers(min_side, max_side + 1, n)
    ws = rng.integers(min_side, max_side + 1, n)
    for i in range(n):
        top, left = rng.integers(0, height - hs[i] + 1), rng.integers(0, width - ws[i] + 1)
        out[i, top:top + hs[i], left:left + ws[i]] = 1.0
    return out


def half_mask(sides: list[str] | tuple[str, ...] | str, height: int, width: int) -> np.ndarray:
    """``(n, height, width, 1)`` masks of one half of the image each (uncropping: that half is generated);
    ``sides`` names the missing half per image (``left``, ``right``, ``top``, ``bottom``)."""
    sides = [sides] if isinstance(sides, str) else list(sides)
    out = np.zeros((len(sides), height, width, 1), np.float32)
    for i, side in enumerate(sides):
        if side == "left":
            out[i, :, : width // 2] = 1.0
        elif side == "right":
            out[i, :, width - width // 2:] = 1.0
        elif side == "top":
            out[i, : height // 2] = 1.0
        elif side == "bottom":
            out[i, height - height // 2:] = 1.0
        else:
            raise ValueError(f"unknown side {side!r}; valid: {', '.join(SIDES)}")
    return out


def fill_masked(images: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fill: str = "noise",
                value: float = 0.0) -> np.ndarray:
    """The source of an inpainting / uncropping pair: ``images`` where ``mask`` is 0; where it is 1, standard
    Gaussian noise (Palette) or the constant ``value`` (``fill="constant"``)."""
    x = _check(images)
    m = np.broadcast_to(np.asarray(mask, np.float32), x.shape)
    if fill == "noise":
        filler = rng.standard_normal(x.shape).astype(np.float32)
    elif fill == "constant":
        filler = np.full(x.shape, value, np.float32)
    else:
        raise ValueError(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")
    return (x * (1.0 - m) + filler * m).astype(np.float32)


def gaussian_kernel(sigma: float, radius: int | None = None) -> np.ndarray:
    """The normalised 1-D Gaussian ``exp(-k^2 / (2 sigma^2))``, ``k = -radius..radius`` (radius ``round(4 sigma)``,
    as scipy's ``gaussian_filter``)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be positive, got {sigma}")
    radius = int(4.0 * sigma + 0.5) if radius is None else radius
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    return w / w.sum()


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of each image and channel, edges extended (replicate padding)."""
    x = _check(images).astype(np.float64)
    w = gaussian_kernel(sigma)
    r = len(w) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        p = np.pad(x, pad, mode="edge")
        size = x.shape[axis]
        x = sum(w[j] * np.take(p, np.arange(j, j + size), axis=axis) for j in range(len(w)))
    return x.astype(np.float32)


def blur_noise(images: np.ndarray, rng: np.random.Generator, blur_sigma: float | np.ndarray,
               noise_std: float | np.ndarray) -> np.ndarray:
    """Restoration source: each image blurred with its ``blur_sigma`` then given Gaussian noise of ``noise_std``
    (scalars, or one per image)."""
    x = _check(images)
    n = x.shape[0]
    sig = np.broadcast_to(np.asarray(blur_sigma, np.float64), (n,))
    std = np.broadcast_to(np.asarray(noise_std, np.float32), (n,))
    blurred = np.concatenate([gaussian_blur(x[i:i + 1], float(sig[i])) for i in range(n)]) if n else x
    return (blurred + std[:, None, None, None] * rng.standard_normal(x.shape).astype(np.float32)).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> 0..255 (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """0..255 -> [-1, 1]."""
    return (np.asarray(images, np.float32) / 127.5 - 1.0).astype(np.float32)


def jpeg(images: np.ndarray, quality: int | np.ndarray) -> np.ndarray:
    """Each image saved as a JPEG by Pillow at ``quality`` (1-95; a scalar or one per image) and decoded back.
    Single-channel images go through Pillow's grayscale ("L") JPEG, three channels through RGB."""
    x = _check(images)
    n, _, _, c = x.shape
    if c not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {c}")
    from PIL import Image

    q = np.broadcast_to(np.asarray(quality, np.int64), (n,))
    if np.any((q < 1) | (q > 95)):
        raise ValueError(f"JPEG quality must be between 1 and 95, got {q.min()}..{q.max()}")
    out = np.empty(x.shape, np.float32)
    for i, im in enumerate(to_uint8(x)):
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if c == 1 else im, "L" if c == 1 else "RGB").save(buf, "JPEG", quality=int(q[i]))
        with Image.open(io.BytesIO(buf.getvalue())) as dec:
            arr = np.asarray(dec, np.uint8)
        out[i] = from_uint8(arr[..., None] if c == 1 else arr)
    return out


DEFAULTS = dict(min_side=3, max_side=5, blur=(0.6, 1.2), noise=(0.1, 0.4), quality=(5, 20), fill="noise")
"""The degradation ranges used for the built-in ``digits-palette`` (8x8 digits)."""


def degrade(images: np.ndarray, task: str, rng: np.random.Generator,
            **options: object) -> tuple[np.ndarray, np.ndarray]:
    """``(source, mask)`` for ``task`` (one of :data:`TASKS`), parameters drawn per image from the ranges in
    :data:`DEFAULTS` (override them by keyword). ``mask`` is the generated region for inpainting / uncropping and
    all ones for the restoration tasks (every pixel is generated)."""
    opts = {**DEFAULTS, **options}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown degradation options {sorted(unknown)}; valid: {', '.join(DEFAULTS)}")
    x = _check(images)
    n, h, w, _ = x.shape
    if task == "inpaint":
        mask = box_mask(rng, n, h, w, opts["min_side"], opts["max_side"])
        return fill_masked(x, mask, rng, opts["fill"]), mask
    if task == "uncrop":
        mask = half_mask([SIDES[i] for i in rng.integers(0, 4, n)], h, w)
        return fill_masked(x, mask, rng, opts["fill"]), mask
    ones = np.ones((n, h, w, 1), np.float32)
    if task == "blur_noise":
        lo, hi = opts["blur"]
        nlo, nhi = opts["noise"]
        return blur_noise(x, rng, rng.uniform(lo, hi, n), rng.uniform(nlo, nhi, n)), ones
    if task == "jpeg":
        qlo, qhi = opts["quality"]
        return jpeg(x, rng.integers(qlo, qhi + 1, n)), ones
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def task_pairs(images: np.ndarray, copies: int, seed: int = 0, tasks: tuple[str, ...] = TASKS,
               **options: object) -> dict[str, np.ndarray]:
    """A multi-task training set: ``copies`` degraded versions of every image, each of a task drawn uniformly from
    ``tasks``. Returns ``{"x": targets, "source": sources, "mask": masks, "task": task ids}`` (ids index ``tasks``)."""
    x = _check(images)
    rng = np.random.default_rng(seed)
    target = np.concatenate([x] * copies)
    task = rng.integers(0, len(tasks), len(target)).astype(np.int32)
    source, mask = np.empty_like(target), np.empty(target.shape[:3] + (1,), np.float32)
    for k, name in enumerate(tasks):
        idx = np.flatnonzero(task == k)
        source[idx], mask[idx] = degrade(target[idx], name, rng, **options)
    return {"x": target, "source": source, "mask": mask, "task": task}
