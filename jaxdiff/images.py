"""Images on the host: PNG grids carrying their generation settings in text chunks, and loading inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SETTINGS_KEY = "jaxdiff"  # PNG tEXt key holding the JSON settings


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 (rounded, as diffusers' ``numpy_to_pil``)."""
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def to_pil(image: np.ndarray) -> Any:
    """One (H, W, C) float image in [0, 1] -> ``PIL.Image``."""
    from PIL import Image

    arr = to_uint8(image)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def grid(images: np.ndarray, cols: int | None = None, pad: int = 0) -> np.ndarray:
    """Tile (N, H, W, C) images row-major into one (rows*H, cols*W, C) image (empty cells are black)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), images.dtype)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, k * (w + pad): k * (w + pad) + w] = im
    return out


def save_png(image: np.ndarray, path: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Write an (H, W, C) float image in [0, 1] as PNG; ``settings`` go into a JSON tEXt chunk and one per key."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if settings:
        info.add_text(SETTINGS_KEY, json.dumps(dict(settings), sort_keys=True))
        for k, v in settings.items():
            if k != SETTINGS_KEY:
                info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path, pnginfo=info)
    return path


def read_settings(path: str | Path) -> dict:
    """The settings :func:`save_png` wrote into a PNG; a clear error when there are none."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    if SETTINGS_KEY not in text:
        raise ValueError(f"{path} has no jaxdiff settings (PNG text chunk {SETTINGS_KEY!r}); "
                         "only images written by `jaxdiff sample` can be reproduced with --from-png")
    return json.loads(text[SETTINGS_KEY])


def load_image(path: str | Path, size: tuple[int, int] | None = None, *, grayscale: bool = False) -> np.ndarray:
    """An image file as float32 (H, W, 3) (or (H, W, 1) with ``grayscale``) in [0, 1]; resized to (H, W) if given."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if grayscale else "RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        arr = np.asarray(im, np.float32) / 255.0
    return arr[..., None] if grayscale else arr
