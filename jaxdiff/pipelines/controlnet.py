"""ControlNet in the Stable Diffusion recipe, as diffusers' ``StableDiffusionControlNet*Pipeline`` run it.

:func:`controlnet_transform` checks that each ControlNet fits the base model, prepares each control
image once (:func:`prepare_control_image`: diffusers' resize and [0, 1] convention) and returns the
network transform (:func:`jaxdiff.models.controlnet.controlnet`) to pass as ``network_transform=`` to
text-to-image, image-to-image or inpainting::

    cn = controlnet_transform(sd, ["canny-net", "depth-net"], [edges, depth], scale=[1.0, 0.5],
                              start=[0.0, 0.2], end=[0.8, 1.0], height=512, width=512)
    images = sd("a house", network_transform=cn, height=512, width=512)

The sampling loop tells the transform the step, the run's first step and its step count
(:class:`jaxdiff.conditioning.StepIndex`), so scales, intervals, control images, step counts and strengths are
runtime values of one compiled program.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from jaxdiff.models.controlnet import ControlNetConfig, ControlNetModel, controlnet, model_config
from jaxdiff.models._pure import PureModel

__all__ = ["check_compatible", "controlnet_transform", "load_controlnet", "prepare_control_image"]


def load_controlnet(path: str | os.PathLike, *, dtype: Any = None, config: Any = None) -> ControlNetModel:
    """A diffusers ``ControlNetModel`` folder (``config.json`` + safetensors), or an original single file
    (``control_*.safetensors``; ``config`` as :func:`jaxdiff.convert.controlnet_ldm.load_controlnet_checkpoint`)."""
    from jaxdiff.convert.folders import load_model_folder

    if not os.path.isdir(path):  # a file: pickles are refused there, with the way to convert them
        from jaxdiff.convert.controlnet_ldm import load_controlnet_checkpoint

        return load_controlnet_checkpoint(path, config, dtype=dtype)
    kwargs = {} if dtype is None else dict(dtype=dtype)
    return load_model_folder(path, class_name="ControlNetModel", **kwargs)


def _nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's ``interpolate(mode="nearest")`` (what diffusers applies to arrays): source index floor(i * in / out)."""
    h, w = image.shape[1:3]
    rows = np.minimum(np.floor(np.arange(height, dtype=np.float32) * np.float32(h / height)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(width, dtype=np.float32) * np.float32(w / width)).astype(int), w - 1)
    return image[:, rows][:, :, cols]


def _from_pil(images: Sequence[Any], height: int, width: int) -> np.ndarray:
    from PIL import Image

    out = []
    for im in images:
        if im.size != (width, height):
            im = im.resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(np.asarray(im.convert("RGB"), np.float32) / 255.0)
    return np.stack(out)


def prepare_control_image(image: Any, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A control image as the ControlNet reads it: (B, height, width, channels) float32 in [0, 1].

    As diffusers' control image processor (``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``):
    PIL images are resized with Lanczos and converted to RGB, then divided by 255; float arrays (H, W, c) or
    (B, H, W, c) are taken in [0, 1] and resized with nearest-neighbour sampling (torch's ``interpolate``).
    """
    from PIL import Image

    items = image if isinstance(image, (list, tuple)) else [image]
    if items and all(isinstance(i, Image.Image) for i in items):
        arr = _from_pil(items, height, width)
    else:
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            raise ValueError("the control image is a uint8 array: give floats in [0, 1] (divide by 255) or a PIL image")
        arr = arr.astype(np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"a control image array must be (H, W, c) or (B, H, W, c), got shape {arr.shape}")
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            raise ValueError(f"control images are in [0, 1] (diffusers' convention), got values in "
                             f"[{arr.min():.3g}, {arr.max():.3g}]; rescale it (e.g. (x + 1) / 2 for [-1, 1])")
        if arr.shape[1:3] != (height, width):
            arr = _nearest(arr, height, width)
    if arr.shape[-1] != channels:
        raise ValueError(f"the control image has {arr.shape[-1]} channels but the ControlNet reads {channels} "
                         "(its conditioning_channels); give an RGB image (e.g. repeat a gray map 3 times)"
                         if channels == 3 else
                         f"the control image has {arr.shape[-1]} channels but the ControlNet reads {channels} "
                         "(its conditioning_channels); convert the control image")
    return arr


def check_compatible(config: ControlNetConfig, unet_config: Any, latent_channels: int, vae_factor: int,
                     index: int = 0) -> None:
    """Raise one clear ValueError when a ControlNet's residuals cannot feed this U-Net (another base model)."""
    fix = "use a ControlNet trained for this base model (its config must copy the U-Net's encoder)"
    pairs = [("block_out_channels", tuple(config.block_out_channels), tuple(unet_config.block_out_channels)),
             ("layers_per_block", config.per_block("layers_per_block"), unet_config.per_block("layers_per_block")),
             ("cross_attention_dim", config.per_block("cross_attention_dim"),
              unet_config.per_block("cross_attention_dim")),
             ("in_channels", config.in_channels, latent_channels)]
    for name, mine, theirs in pairs:
        if mine != theirs:
            raise ValueError(f"ControlNet {index} has {name}={mine} but the base model needs {theirs}; {fix}")
    if config.cond_downscale != vae_factor:
        raise ValueError(f"ControlNet {index} encodes control images {config.cond_downscale}x down but the VAE's "
                         f"latents are {vae_factor}x smaller than the image; {fix}")


def _load(model: Any, dtype: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        return PureModel.of(load_controlnet(model, dtype=dtype))
    return model


def controlnet_transform(sd: Any, models: Any, images: Any, *, height: int | None = None, width: int | None = None,
                         scale: Any = 1.0, start: Any = 0.0, end: Any = 1.0, guess_mode: bool = False) -> Any:
    """The network transform for ``sd(..., network_transform=...)``: ControlNets (modules, ``PureModel``-s or
    folder paths; one or a list) with one control image each, ``scale`` (``controlnet_conditioning_scale``),
    ``start`` / ``end`` (``control_guidance_start`` / ``_end``, fractions of the steps that run) and
    ``guess_mode``, as in diffusers. A control image applies to every prompt of the call; a batch of them
    (a list of PIL images, or an array (B, H, W, c)) gives prompt ``i`` image ``i`` (B must be the prompt count)."""
    many = isinstance(models, (list, tuple))
    nets = [_load(m, sd.models.unet.module().dtype) for m in (models if many else [models])]
    if not many:
        images = [images]  # for one ControlNet a list is a batch of control images (diffusers)
    elif not isinstance(images, (list, tuple)) or len(images) != len(nets):
        got = f"{len(images)} control images" if isinstance(images, (list, tuple)) else "one control image"
        raise ValueError(f"got {got} for {len(nets)} ControlNets; give a list with one control image per ControlNet")
    height = sd.default_size if height is None else int(height)
    width = sd.default_size if width is None else int(width)
    unet_config = sd.models.unet.module().config
    prepared = []
    for k, (net, image) in enumerate(zip(nets, images)):
        cfg = model_config(net)
        check_compatible(cfg, unet_config, sd.models.latent_channels, sd.models.vae_factor, k)
        prepared.append(prepare_control_image(image, height, width, cfg.conditioning_channels))
    sizes = sorted({a.shape[0] for a in prepared})
    if len(sizes) > 1 and (len(sizes) > 2 or sizes[0] != 1):
        raise ValueError(f"the ControlNets' control images come in batches of {sizes}: give each ControlNet one "
                         "image (shared by every prompt) or one per prompt, the same count for all")
    if sizes[-1] > 1:  # one control image per prompt: the recipe hands image i its own (PerImage)
        prepared = [np.repeat(a, sizes[-1] // a.shape[0], axis=0) for a in prepared]
    return controlnet(nets if many else nets[0], prepared if many else prepared[0], scale, start, end,
                      guess_mode=guess_mode, per_image=sizes[-1] > 1)
