"""Class-conditional video sampling, extension and judging for :class:`~jaxdiff.models.video_unet.ClassVideoUNet`
models such as the built-in ``digits-video`` (Ho et al. 2022, "Video Diffusion Models").

- :func:`sample_videos`: a clip of the model's window length (its training frame count) per label, with
  classifier-free guidance (Ho & Salimans 2022) in one compiled sampling loop.
- :func:`extend_videos`: longer clips, autoregressively (Ho et al. 2022 Sec. 3.1): each new window keeps the
  last ``overlap`` frames of the clip so far as known data ``x^a`` and samples the rest ``x^b`` either with
  **reconstruction guidance** (:func:`jaxdiff.video_guidance.reconstruction_guidance`, eq. 7) or the
  **replacement** method (:func:`jaxdiff.video_guidance.replacement`).
- :func:`judge_videos`: the ``digits-eval`` judge's class of every frame, read from the 8x8 window with the most
  ink (:func:`jaxdiff.data.moving_digits.sprite_crops`; the sprites are the digits' own 8x8 resolution).
- :func:`write_gif` / :func:`read_gif`: animated GIFs through Pillow.

Videos are (N, F, H, W, 1) in [0, 1] outside, [-1, 1] inside the model.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import guidance as G
from jaxdiff import sampling, schedules
from jaxdiff.convert import abstract, load_torch_tensors, open_safetensors
from jaxdiff.builtin import vp_alphas_cumprod
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.models._pure import PureModel
from jaxdiff.models.video_unet import ClassVideoUNet, ClassVideoUNetConfig
from jaxdiff.samplers import get_sampler
from jaxdiff.video_guidance import frame_mask, reconstruction_guidance, replacement

Array = jax.Array
METHODS = ("reconstruction", "replacement")


class VideoModel:
    """A loaded class-conditional video model: ``denoiser`` (``cond`` = (B,) int labels, ``null_label`` none),
    the folder's ``config`` (network, adapter, data, sampling) and the frame ``window`` it was trained on."""

    def __init__(self, net: PureModel, config: dict[str, Any]):
        self.net = net
        self.config = config
        adapter = config["adapter"]
        self.alphas_cumprod = jnp.asarray(vp_alphas_cumprod(adapter))
        self.denoiser = DiscreteVPDenoiser(net, self.alphas_cumprod, adapter["prediction"])
        self.null_label = int(adapter["null_label"])
        data = config["data"]
        self.window, self.size, self.sprite = int(data["frames"]), int(data["size"]), int(data["sprite"])

    def sigma_range(self) -> tuple[float, float]:
        """``(sigma_min, sigma_max)`` of sampling: the training schedule's smallest level and the config's
        ``sampling.sigma_max`` (else ``adapter.sigma_max_sampling``, else 80)."""
        train = schedules.vp_sigmas(np.asarray(self.alphas_cumprod))
        top = self.config.get("sampling", {}).get("sigma_max", self.config["adapter"].get("sigma_max_sampling", 80.0))
        return float(train[0]), float(min(train[-1], top))

    def sigmas(self, steps: int, schedule: str | None = None) -> schedules.Sigmas:
        """``steps`` levels of ``schedule`` (default the config's, karras) over the model's noise range."""
        lo, hi = self.sigma_range()
        return schedules.get_schedule(schedule or self.config.get("sampling", {}).get("schedule", "karras"))(
            steps, lo, hi)


@functools.lru_cache(maxsize=4)
def load_video_model(folder: str | Path) -> VideoModel:
    """A video model folder (``config.json`` with ``network`` / ``adapter`` / ``data``, ``model.safetensors``)."""
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} is not a video model folder (it needs config.json and model.safetensors; "
                                "examples/video/train.py writes one)")
    config = json.loads((folder / "config.json").read_text())
    cfg = ClassVideoUNetConfig.from_dict(config["network"])
    with open_safetensors(folder / "model.safetensors") as tensors:
        module = load_torch_tensors(abstract(lambda: ClassVideoUNet(cfg, rngs=nnx.Rngs(0))), tensors)
    return VideoModel(PureModel.of(module), config)


def _labels(model: VideoModel, labels: Any) -> jax.Array:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (N,) integer array, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > model.null_label:
        raise ValueError(f"labels must be digits 0-{model.null_label - 1} (or {model.null_label}: no label), "
                         f"got values {labels.min()}..{labels.max()}")
    return jnp.asarray(labels, jnp.int32)


def _guided(model: VideoModel, labels: jax.Array, guidance: float, transform: Any = None) -> Any:
    """Classifier-free guidance, then (config ``sampling.clip_x0``) the x0 estimate clipped to [-1, 1] (static
    thresholding, as DDPM's sampler and Imagen do), then ``transform`` (e.g. reconstruction guidance)."""
    null = jnp.full(labels.shape, model.null_label, jnp.int32)
    guide = None if guidance == 1.0 else G.classifier_free(guidance, null)
    clip = G.static_threshold() if model.config.get("sampling", {}).get("clip_x0", False) else None
    return G.apply(model.denoiser, guide, clip, transform)


def _window(model: VideoModel, labels: jax.Array, key: Array, *, steps: int, guidance: float, sampler: str,
            transform: Any = None, schedule: str | None = None) -> Array:
    sigmas = model.sigmas(steps, schedule)
    shape = (labels.shape[0], model.window, model.size, model.size, 1)
    x = sampling.initial_noise(jax.random.fold_in(key, 1), shape, sigmas.values[0], 1.0)
    den = _guided(model, labels, guidance, transform)
    return sampling.sample(den, get_sampler(sampler), sigmas, x, jax.random.fold_in(key, 2), labels)


def _defaults(model: VideoModel, steps: int | None, guidance: float | None, sampler: str | None) -> tuple:
    s = model.config.get("sampling", {})
    return (steps or s.get("steps", 20), s.get("guidance", 2.0) if guidance is None else guidance,
            sampler or s.get("sampler", "dpmpp_2m"))


def sample_videos(model: VideoModel, labels: Any, *, steps: int | None = None, guidance: float | None = None,
                  sampler: str | None = None, schedule: str | None = None, seed: int = 0) -> np.ndarray:
    """One clip of ``model.window`` frames per label: (N, F, H, W, 1) in [0, 1]. ``guidance`` is the classifier-free
    scale (1: the conditional model alone; label ``null_label``: unconditional); defaults from the model's config."""
    steps, guidance, sampler = _defaults(model, steps, guidance, sampler)
    out = _window(model, _labels(model, labels), jax.random.key(seed), steps=steps, guidance=guidance, sampler=sampler,
                  schedule=schedule)
    return np.clip((np.asarray(out, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def extend_videos(model: VideoModel, videos: Any, labels: Any, frames: int, *, method: str = "reconstruction",
                  weight: float = 4.0, overlap: int | None = None, steps: int | None = None,
                  guidance: float | None = None, sampler: str | None = None, schedule: str | None = None,
                  seed: int = 0) -> np.ndarray:
    """Extend clips (N, F0, H, W, 1) in [0, 1] to ``frames`` frames: (N, frames, H, W, 1), the first F0 unchanged.

    Each step samples a window of ``model.window`` frames whose first ``overlap`` (default half the window) are
    the clip's last frames, known, with ``method`` ``"reconstruction"`` (Ho et al. 2022 eq. 7, weight ``w_r`` =
    ``weight``, known frames replaced too) or ``"replacement"`` (the baseline); the window's remaining frames are
    appended. One compiled loop serves every step (known data and masks are traced).
    """
    if method not in METHODS:
        raise ValueError(f"unknown extension method {method!r}; valid: {', '.join(METHODS)}")
    videos = np.asarray(videos, np.float32)
    if videos.ndim != 5 or videos.shape[2:] != (model.size, model.size, 1):
        raise ValueError(f"videos must be (N, F, {model.size}, {model.size}, 1) in [0, 1], got {videos.shape}")
    w = model.window
    overlap = w // 2 if overlap is None else overlap
    if not 0 < overlap < w or videos.shape[1] < overlap:
        raise ValueError(f"overlap must be in [1, {w - 1}] and at most the clip's {videos.shape[1]} frames, "
                         f"got {overlap}")
    steps, guidance, sampler = _defaults(model, steps, guidance, sampler)
    labels = _labels(model, labels)
    if labels.shape[0] != videos.shape[0]:
        raise ValueError(f"one label per clip: {videos.shape[0]} clips, {labels.shape[0]} labels")
    mask = frame_mask(w, range(overlap))
    clip = jnp.asarray(videos * 2.0 - 1.0)
    key = jax.random.key(seed)
    i = 0
    while clip.shape[1] < frames:
        known = jnp.zeros((clip.shape[0], w, *clip.shape[2:]), clip.dtype).at[:, :overlap].set(clip[:, -overlap:])
        if method == "reconstruction":
            t = reconstruction_guidance(known, mask, weight)
        else:
            t = replacement(known, mask)
        out = _window(model, labels, jax.random.fold_in(key, i), steps=steps, guidance=guidance, sampler=sampler,
                      transform=t, schedule=schedule)
        clip = jnp.concatenate([clip, out[:, overlap:]], axis=1)
        i += 1
    return np.clip((np.asarray(clip[:, :frames], np.float32) + 1.0) / 2.0, 0.0, 1.0)


def sample_long(model: VideoModel, labels: Any, frames: int, *, method: str = "reconstruction", weight: float = 4.0,
                steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                schedule: str | None = None, seed: int = 0) -> np.ndarray:
    """``frames`` frames per label: one window (:func:`sample_videos`), then :func:`extend_videos` when longer."""
    if frames < 1:
        raise ValueError(f"frames must be positive, got {frames}")
    first = sample_videos(model, labels, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule, seed=seed)
    if frames <= model.window:
        return first[:, :frames]
    return extend_videos(model, first, labels, frames, method=method, weight=weight, steps=steps, guidance=guidance,
                         sampler=sampler, schedule=schedule, seed=seed + 1)


# ---- judging ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _judge() -> tuple[Any, Any]:
    from jaxdiff import builtin

    net = builtin.load_builtin("digits-eval")
    return jax.jit(lambda x: net(x)), jax.jit(lambda x: net.bind("features")(x))


def judge_inputs(videos: Any, sprite: int = 8) -> np.ndarray:
    """Each frame's 8x8 digit for the ``digits-eval`` judge: (N, F, 8, 8, 1) in [-1, 1] (the ``sprite`` window with the
    most ink, :func:`jaxdiff.data.moving_digits.sprite_crops`; ``sprite`` must be 8, the judge's input)."""
    from jaxdiff.data.moving_digits import sprite_crops

    if sprite != 8:
        raise ValueError(f"the judge reads 8x8 digits; clips need sprite=8, got {sprite}")
    crops, _ = sprite_crops(videos, sprite)
    return (crops * 2.0 - 1.0)[..., None]


def judge_videos(videos: Any, sprite: int = 8) -> np.ndarray:
    """The judge's digit for every frame of (N, F, H, W, 1) clips in [0, 1]: (N, F) ints."""
    x = judge_inputs(videos, sprite)
    logits, _ = _judge()
    return np.asarray(logits(jnp.asarray(x.reshape(-1, 8, 8, 1)))).argmax(-1).reshape(x.shape[:2])


def judge_features(videos: Any, sprite: int = 8) -> np.ndarray:
    """The judge's penultimate features of every frame, (N * F, D) (for Frechet distances)."""
    x = judge_inputs(videos, sprite)
    _, feats = _judge()
    return np.asarray(feats(jnp.asarray(x.reshape(-1, 8, 8, 1))))


# ---- GIFs ------------------------------------------------------------------------------------

def write_gif(video: Any, path: str | Path, *, scale: int = 4, fps: float = 8.0) -> Path:
    """Write a clip (F, H, W[, 1]) in [0, 1] as a looping animated GIF (grey levels, each pixel ``scale x scale``)."""
    from PIL import Image

    v = np.asarray(video, np.float32)
    if v.ndim == 4 and v.shape[-1] == 1:
        v = v[..., 0]
    if v.ndim != 3 or v.shape[0] < 1:
        raise ValueError(f"a GIF needs one clip (F, H, W) or (F, H, W, 1), got shape {np.shape(video)}; "
                         "write one clip of a batch at a time or tile them first")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    big = np.repeat(np.repeat(v, scale, axis=1), scale, axis=2)
    frames = [Image.fromarray((np.clip(f, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L") for f in big]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0,
                   optimize=False, disposal=1)
    return path


def read_gif(path: str | Path) -> np.ndarray:
    """The frames of a GIF as (F, H, W) float32 in [0, 1] (grey levels)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("L"), np.float32) / 255.0 for f in ImageSequence.Iterator(im)])


def tile_videos(videos: Any, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Clips (N, F, H, W[, 1]) side by side as one clip (F, rows * (H + pad) + pad, cols * (W + pad) + pad), grey
    borders."""
    v = np.asarray(videos, np.float32)
    if v.ndim == 5:
        v = v[..., 0]
    n, f, h, w = v.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    out = np.full((f, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5, np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = v[i]
    return out
