"""Palette (Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022): image-to-image
diffusion by concatenation.

One conditional U-Net (diffusers ``UNet2DModel`` layout, ``in_channels = 2 x`` the image's) reads the noisy
target concatenated on the channel axis with the source image (:func:`jaxdiff.conditioning.concat`, a network
transform, so guidance and samplers compose as for any denoiser) and is trained with the plain denoising
loss (:mod:`jaxdiff.train.palette`); the task is implied by the source alone:

- ``inpaint``: the masked region of the source is filled with Gaussian noise (the paper's choice);
- ``uncrop``: the same with half of the image masked;
- ``restore``: the source is a degraded picture (blur + noise, or a low-quality JPEG).

Like Palette's inference, :meth:`Palette.__call__` keeps the known pixels of inpainting / uncropping sources
(``known``, ``mask``); the regression baseline of the paper is :class:`PaletteRegressor`. The built-in
``digits-palette`` (8x8 digits, one multi-task model) is trained by ``examples/palette/train_palette.py``::

    pal = Palette.from_builtin()
    source, mask = make_source(images, "inpaint", mask)      # images NHWC in [-1, 1]
    restored = pal(source, mask=mask, known=images, seed=0)  # (N, 8, 8, 1) in [-1, 1]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditioning, sampling, schedules
from jaxdiff.data.degradations import fill_masked, half_mask
from jaxdiff.builtin import vp_alphas_cumprod
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.samplers import get_sampler
from jaxdiff.train.palette import Regressor

Array = jax.Array
TASKS = ("inpaint", "uncrop", "restore")
WEIGHTS = {"diffusion_l2": "model.safetensors", "diffusion_l1": "diffusion_l1.safetensors",
           "regression": "regression.safetensors"}
"""The files of a Palette folder: the shipped model and the paper's two baselines (L1 loss, regression)."""


def make_source(images: Any, task: str, mask: Any = None, seed: int = 0,
                side: str = "right") -> tuple[np.ndarray, np.ndarray | None]:
    """``(source, mask)`` of a task for clean (or already degraded) ``images`` NHWC in [-1, 1].

    ``inpaint``: ``mask`` (N or 1, H, W, 1), 1 = fill in, is required; ``uncrop``: ``mask`` defaults to the half
    named by ``side``; the masked pixels become standard Gaussian noise (seeded). ``restore``: the images are the
    source as they are (mask None).
    """
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be NHWC (N, H, W, C) in [-1, 1], got shape {x.shape}")
    if task == "restore":
        return x, None
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if mask is None:
        if task == "inpaint":
            raise ValueError("inpainting needs a mask (1 where the image is to be filled in): give mask=")
        mask = half_mask([side] * x.shape[0], x.shape[1], x.shape[2])
    m = np.asarray(mask, np.float32)
    if m.ndim == 3:
        m = m[..., None]
    if m.ndim != 4 or m.shape[1:3] != x.shape[1:3] or m.shape[-1] != 1 or m.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"mask must be (N or 1, {x.shape[1]}, {x.shape[2]}, 1) with 1 = fill in, got {m.shape}")
    m = np.broadcast_to((m > 0.5).astype(np.float32), x.shape[:3] + (1,)).copy()
    return fill_masked(x, m, np.random.default_rng(seed)), m


def _read_folder(folder: Path, variant: str) -> tuple[dict, Any]:
    from jaxdiff.convert import open_safetensors
    from jaxdiff.convert.torch_layout import build_from_tensors
    from jaxdiff.models._pure import PureModel
    from jaxdiff.models.unet2d import UNet2DConfig, UNet2DModel

    if variant not in WEIGHTS:
        raise ValueError(f"unknown Palette variant {variant!r}; valid: {', '.join(WEIGHTS)}")
    cfg_path, weights = folder / "config.json", folder / WEIGHTS[variant]
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; train it with examples/palette/train_palette.py")
    cfg = json.loads(cfg_path.read_text())
    with open_safetensors(weights) as tensors:
        module = build_from_tensors(UNet2DModel, UNet2DConfig, cfg["network"], tensors)
    return cfg, PureModel.of(module)


def _composite(out: Array, known: Any, mask: Any) -> Array:
    if mask is None:
        return out
    if known is None:
        raise ValueError("give known= (the image whose unmasked pixels are kept) with mask=")
    m = jnp.asarray(mask, out.dtype)
    return jnp.asarray(known, out.dtype) * (1.0 - m) + out * m


def _repeat(a: Any, k: int) -> Any:
    return None if a is None else np.repeat(np.asarray(a, np.float32), k, axis=0)


@dataclass(frozen=True)
class Palette:
    """A Palette model: ``net(concat([x_t, source]), t)`` on a discrete VP schedule with epsilon prediction."""

    net: Any
    alphas_cumprod: Array
    config: dict

    @classmethod
    def from_folder(cls, folder: str | Path, variant: str = "diffusion_l2") -> "Palette":
        """A folder written by ``examples/palette/train_palette.py`` (``config.json`` and the weights of
        ``variant``: ``diffusion_l2``, the shipped model, or ``diffusion_l1``)."""
        if variant == "regression":
            raise ValueError("the regression baseline is PaletteRegressor.from_folder, not a diffusion model")
        cfg, net = _read_folder(Path(folder), variant)
        return cls(net, jnp.asarray(vp_alphas_cumprod(cfg["adapter"]), jnp.float32), cfg)

    @classmethod
    def from_builtin(cls, name: str = "digits-palette", variant: str = "diffusion_l2") -> "Palette":
        """The built-in model (``jaxdiff.builtin``), or one of its baselines."""
        from jaxdiff import builtin

        return cls.from_folder(builtin.builtin_folder(name), variant)

    @property
    def image_channels(self) -> int:
        return int(self.config["network"]["out_channels"])

    def denoiser(self, source: Any) -> DiscreteVPDenoiser:
        """``D(x, sigma) -> x0_hat`` for sources (B, H, W, C): the network with the source concatenated."""
        src = jnp.asarray(source, jnp.float32)
        if src.ndim != 4 or src.shape[-1] != self.image_channels:
            raise ValueError(f"source must be NHWC with {self.image_channels} channel(s), got shape {src.shape}")
        net = conditioning.apply(self.net, conditioning.concat(src))
        return DiscreteVPDenoiser(net, self.alphas_cumprod, self.config["adapter"]["prediction"])

    def sigmas(self, steps: int, schedule: str = "karras") -> schedules.Sigmas:
        """``steps`` levels over the training range (capped at ``sigma_max_sampling``)."""
        train = schedules.vp_sigmas(np.asarray(self.alphas_cumprod))
        hi = float(min(train[-1], self.config["adapter"].get("sigma_max_sampling", 80.0)))
        return schedules.get_schedule(schedule)(steps, float(train[0]), hi)

    def __call__(self, source: Any, *, mask: Any = None, known: Any = None, steps: int | None = None,
                 seed: int = 0, sampler: str | None = None, schedule: str | None = None, samples: int = 1,
                 progress: bool = False) -> np.ndarray:
        """Restored images in [-1, 1]: ``samples`` draws per source, ``(N * samples, H, W, C)`` (draws of one
        source adjacent). With ``mask`` (1 = generated) the pixels outside it are ``known``'s."""
        opts = self.config.get("sampling", {})
        sigmas = self.sigmas(steps or opts.get("steps", 20), schedule or opts.get("schedule", "karras"))
        src = _repeat(source, samples)
        key = jax.random.key(seed)
        x = sampling.initial_noise(jax.random.fold_in(key, 1), src.shape[:3] + (self.image_channels,),
                                   sigmas.values[0], 1.0)
        out = sampling.sample(self.denoiser(src), get_sampler(sampler or opts.get("sampler", "dpmpp_2m")), sigmas,
                              x, jax.random.fold_in(key, 2), progress=progress)
        return np.asarray(_composite(out, _repeat(known, samples), _repeat(mask, samples)))


@jax.jit
def _regress_jit(net: Any, source: Array) -> Array:
    """The regressor's output for a batch of sources: one compiled program per source shape, reused by every call."""
    return Regressor(net)(source)


@dataclass(frozen=True)
class PaletteRegressor:
    """The paper's regression baseline: the same network predicting the target from the source in one call."""

    net: Any
    config: dict

    @classmethod
    def from_folder(cls, folder: str | Path) -> "PaletteRegressor":
        cfg, net = _read_folder(Path(folder), "regression")
        return cls(net, cfg)

    @classmethod
    def from_builtin(cls, name: str = "digits-palette") -> "PaletteRegressor":
        from jaxdiff import builtin

        return cls.from_folder(builtin.builtin_folder(name))

    def __call__(self, source: Any, *, mask: Any = None, known: Any = None, **_: Any) -> np.ndarray:
        out = _regress_jit(self.net, jnp.asarray(source, jnp.float32))
        return np.asarray(_composite(out, known, mask))
