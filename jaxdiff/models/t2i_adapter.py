"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models"), NHWC.

Architecture-compatible with diffusers 0.42's ``T2IAdapter`` (``adapter_type`` ``"full_adapter"`` and
``"light_adapter"``) and ``MultiAdapter``: a small convolutional encoder of the control image (pixel
unshuffle, then one block per U-Net down block) whose multi-scale features are added inside the U-Net's
down blocks (``down_intrablock_additional_residuals``; :class:`jaxdiff.conditioning.Residuals` ``intra``).
Unlike ControlNet it does not read the latents, the timestep or the text, so the features are computed
once per control image and reused at every sampling step (:func:`t2i_adapter`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.conditioning import CONDITIONAL, PerImage, Residuals, Transform, per_image_value, side_network, tile_batch
from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models._pure import PureModel
from jaxdiff.models.layers import Maker, config_from_dict

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()
ADAPTER_TYPES = ("full_adapter", "light_adapter")

__all__ = ["AdapterFeatures", "MultiAdapter", "T2IAdapter", "T2IAdapterConfig", "adapter_features", "control_image",
           "load_multi_adapter", "pixel_unshuffle", "t2i_adapter"]


@dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers ``T2IAdapter`` ``config.json``."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def validate(self) -> None:
        """Raise a ValueError naming any unsupported setting."""
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"unsupported adapter_type {self.adapter_type!r}; jaxdiff supports {ADAPTER_TYPES} "
                             "(full_adapter_xl is SDXL's)")
        if not self.channels or min(self.channels) < 1 or self.in_channels < 1 or self.downscale_factor < 1:
            raise ValueError("channels, in_channels and downscale_factor must be positive")
        if self.adapter_type == "light_adapter" and min(self.channels) < 4:
            raise ValueError("a light adapter needs at least 4 channels per block (its blocks run at channels // 4)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T2IAdapterConfig":
        cfg = config_from_dict(cls, dict(d))
        cfg.validate()
        return cfg

    @property
    def num_features(self) -> int:
        """Feature maps returned: one per full-adapter block; a light adapter adds one block."""
        return len(self.channels) + (self.adapter_type == "light_adapter")

    @property
    def total_downscale_factor(self) -> int:
        """Control-image size / size of the last feature map (diffusers' ``total_downscale_factor``)."""
        return self.downscale_factor * 2 ** (self.num_features - 1)


def pixel_unshuffle(x: Array, r: int) -> Array:
    """``torch.nn.PixelUnshuffle(r)`` in NHWC: (B, H, W, C) -> (B, H/r, W/r, C*r*r), channel ``c*r*r + i*r + j``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def avg_pool_ceil(x: Array) -> Array:
    """``torch.nn.AvgPool2d(2, 2, ceil_mode=True)`` in NHWC: a window cut by an odd edge averages what it covers."""
    b, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    pad = ((0, 0), (0, ph), (0, pw), (0, 0))
    windows = (b, (h + ph) // 2, 2, (w + pw) // 2, 2, c)
    total = jnp.pad(x, pad).reshape(windows).sum(axis=(2, 4))
    if not (ph or pw):
        return total / 4
    count = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), pad).reshape((1,) + windows[1:5] + (1,)).sum(axis=(2, 4))
    return total / count


class AdapterResnetBlock(nnx.Module):
    """``x + block2(relu(block1(x)))``; ``block2`` is 1x1 in the full adapter, 3x3 in the light one."""

    def __init__(self, channels: int, mk: Maker, second_kernel: int):
        self.block1 = mk.conv(channels, channels, 3)
        self.block2 = mk.conv(channels, channels, second_kernel)

    def __call__(self, x: Array) -> Array:
        return self.block2(jax.nn.relu(self.block1(x))) + x


class AdapterBlock(nnx.Module):
    """Full adapter stage: optional 2x average pool, 1x1 ``in_conv`` when the width changes, resnets."""

    def __init__(self, cin: int, cout: int, n: int, mk: Maker, down: bool = False):
        self.down = down
        self.in_conv = mk.conv(cin, cout, 1) if cin != cout else None
        self.resnets = nnx.List([AdapterResnetBlock(cout, mk, 1) for _ in range(n)])

    def __call__(self, x: Array) -> Array:
        if self.down:
            x = avg_pool_ceil(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        for block in self.resnets:
            x = block(x)
        return x


class LightAdapterBlock(nnx.Module):
    """Light adapter stage: optional 2x average pool, 1x1 ``in_conv`` to ``cout // 4``, resnets, 1x1 ``out_conv``."""

    def __init__(self, cin: int, cout: int, n: int, mk: Maker, down: bool = False):
        mid = cout // 4
        self.down = down
        self.in_conv = mk.conv(cin, mid, 1)
        self.resnets = nnx.List([AdapterResnetBlock(mid, mk, 3) for _ in range(n)])
        self.out_conv = mk.conv(mid, cout, 1)

    def __call__(self, x: Array) -> Array:
        if self.down:
            x = avg_pool_ceil(x)
        x = self.in_conv(x)
        for block in self.resnets:
            x = block(x)
        return self.out_conv(x)


class FullAdapter(nnx.Module):
    """Pixel unshuffle, ``conv_in``, one :class:`AdapterBlock` per entry of ``channels`` (all but the first halve)."""

    def __init__(self, cfg: T2IAdapterConfig, mk: Maker):
        ch, n = cfg.channels, cfg.num_res_blocks
        self.conv_in = mk.conv(cfg.in_channels * cfg.downscale_factor ** 2, ch[0], 3)
        self.body = nnx.List([AdapterBlock(ch[0], ch[0], n, mk)]
                             + [AdapterBlock(ch[i - 1], ch[i], n, mk, down=True) for i in range(1, len(ch))])

    def __call__(self, x: Array) -> tuple[Array, ...]:
        x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return tuple(features)


class LightAdapter(nnx.Module):
    """Pixel unshuffle, then ``len(channels) + 1`` :class:`LightAdapterBlock` s (the last repeats the last width)."""

    def __init__(self, cfg: T2IAdapterConfig, mk: Maker):
        ch, n = cfg.channels, cfg.num_res_blocks
        blocks = [LightAdapterBlock(cfg.in_channels * cfg.downscale_factor ** 2, ch[0], n, mk)]
        blocks += [LightAdapterBlock(ch[i], ch[i + 1], n, mk, down=True) for i in range(len(ch) - 1)]
        blocks.append(LightAdapterBlock(ch[-1], ch[-1], n, mk, down=True))
        self.body = nnx.List(blocks)

    def __call__(self, x: Array) -> tuple[Array, ...]:
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return tuple(features)


class T2IAdapter(nnx.Module):
    """``__call__(image) -> features``: control image (B, H, W, in_channels) -> one NHWC map per U-Net down block.

    As diffusers' ``T2IAdapter.forward``; the image is used as given (diffusers' pipeline hands PIL images
    over in [0, 1]). H and W must be multiples of ``downscale_factor``.
    """

    def __init__(self, config: T2IAdapterConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        mk = Maker(rngs, dtype, param_dtype)
        kind = FullAdapter if config.adapter_type == "full_adapter" else LightAdapter
        self.adapter = kind(config, mk)

    def check_image(self, shape: tuple[int, ...]) -> None:
        """One clear error for a control image this adapter cannot read."""
        cfg = self.config
        if len(shape) != 4 or shape[-1] != cfg.in_channels:
            raise ValueError(f"the T2I-Adapter reads NHWC control images with {cfg.in_channels} channel(s) "
                             f"(in_channels), got shape {tuple(shape)}; convert the control image to "
                             f"{cfg.in_channels} channel(s)")
        f = cfg.downscale_factor
        if shape[1] % f or shape[2] % f:
            raise ValueError(f"the control image is {shape[1]}x{shape[2]} but the T2I-Adapter needs a height and width "
                             f"that are multiples of {f} (downscale_factor): resize it to the generated image's size")

    def __call__(self, image: Array) -> tuple[Array, ...]:
        self.check_image(tuple(image.shape))
        x = pixel_unshuffle(jnp.asarray(image).astype(self.dtype), self.config.downscale_factor)
        return self.adapter(x)


class MultiAdapter(nnx.Module):
    """Several adapters, their features summed with ``adapter_weights`` (diffusers ``MultiAdapter``; default 1/K)."""

    def __init__(self, adapters: Sequence[T2IAdapter]):
        adapters = list(adapters)
        if len(adapters) < 2:
            raise ValueError("a MultiAdapter needs at least two adapters; use the T2IAdapter itself for one")
        scales = [(a.config.downscale_factor, a.config.total_downscale_factor) for a in adapters]
        for i, s in enumerate(scales):
            if s != scales[0]:
                raise ValueError(f"adapter {i} downscales by {s[0]} (total {s[1]}) but adapter 0 by {scales[0][0]} "
                                 f"(total {scales[0][1]}): combine adapters built for the same U-Net")
        self.adapters = nnx.List(adapters)

    def each(self, images: Sequence[Array]) -> list[tuple[Array, ...]]:
        """Every adapter's features of its own control image."""
        if len(images) != len(self.adapters):
            raise ValueError(f"give one control image per adapter: {len(self.adapters)} adapters, {len(images)} images")
        return [a(im) for a, im in zip(self.adapters, images)]

    def __call__(self, images: Sequence[Array], adapter_weights: Any = None) -> tuple[Array, ...]:
        k = len(self.adapters)
        w = jnp.full((k,), 1.0 / k) if adapter_weights is None else _weights(adapter_weights, k)
        return _weighted_sum(_stack(self.each(images)), w)


def load_multi_adapter(path: Any, *, dtype: Any = jnp.float32) -> MultiAdapter:
    """A MultiAdapter as diffusers' ``MultiAdapter.save_pretrained`` writes it: folders ``path``, ``path_1``, ..."""
    from pathlib import Path

    from jaxdiff.convert.folders import load_model_folder

    folders = [Path(path)]
    while Path(f"{path}_{len(folders)}").is_dir():
        folders.append(Path(f"{path}_{len(folders)}"))
    if not folders[0].is_dir():
        raise FileNotFoundError(f"no T2I-Adapter folder at {path} (a MultiAdapter is saved as {path}, {path}_1, ...)")
    return MultiAdapter([load_model_folder(f, class_name="T2IAdapter", dtype=dtype) for f in folders])


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> T2IAdapter:
    """Build the adapter abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    return build_from_tensors(T2IAdapter, T2IAdapterConfig, config_dict, tensors,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)


# ---- the network transform --------------------------------------------------------------------------

def _weights(scale: Any, k: int) -> Array:
    """A scale for each of ``k`` adapters: one number for all, or one per adapter."""
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, k)):
        raise ValueError(f"give one conditioning scale, or one per adapter ({k}), got shape {tuple(s.shape)}")
    return jnp.broadcast_to(s.reshape(-1) if s.ndim else s, (k,))


def _stack(per_adapter: Sequence[Sequence[Array]]) -> tuple[Array, ...]:
    """Features of K adapters -> one (K, B, h, w, c) array per U-Net down block."""
    levels = {len(f) for f in per_adapter}
    if len(levels) != 1:
        raise ValueError(f"the adapters give {sorted(levels)} feature maps: combine adapters built for the same U-Net")
    out = []
    for i, maps in enumerate(zip(*per_adapter)):
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) != 1:
            raise ValueError(f"the adapters' feature maps {i} have shapes {sorted(shapes)}: give control images of one "
                             "size to adapters built for the same U-Net")
        out.append(jnp.stack([jnp.asarray(m) for m in maps]))
    return tuple(out)


def _weighted_sum(stacked: Sequence[Array], weights: Array) -> tuple[Array, ...]:
    """``sum_k weights[k] * features[k]`` per down block (diffusers' MultiAdapter accumulation)."""
    return tuple(jnp.tensordot(weights.astype(f.dtype), f, axes=1) for f in stacked)


@pytree_dataclass
class AdapterFeatures:
    """``side(x, t, cond) -> Residuals(intra=features)``: precomputed adapter features for :func:`side_network`.

    ``features`` holds one (B, h, w, c) map per U-Net down block (B control images), tiled over the network
    batch (classifier-free guidance doubles it), as diffusers' ``StableDiffusionAdapterPipeline`` repeats the
    adapter state for both halves. ``factor`` (static, 0 if unknown) is the control-image size / latent
    size, for the error message.
    """

    features: tuple[Any, ...]  # arrays, or PerImage-s of one entry per prompt (t2i_adapter(..., per_image=True))
    factor: int = static_field(default=0)

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Residuals:
        features = tuple(per_image_value(f) for f in self.features)
        h, w = features[0].shape[1:3]
        if (h, w) != tuple(x.shape[1:3]):
            size = (f" ({x.shape[1] * self.factor}x{x.shape[2] * self.factor} pixels)" if self.factor else "")
            raise ValueError(f"the T2I-Adapter features are {h}x{w} but the latents are {x.shape[1]}x{x.shape[2]}: "
                             f"give a control image of the generated image's size{size}")
        images = features[0].shape[0]
        guided = isinstance(cond, Mapping) and cond.get(CONDITIONAL) is not None
        if images > 1 and guided and (x.shape[0] // 2) % images:
            raise ValueError(f"{images} control images for {x.shape[0] // 2} image(s) per half of classifier-free "
                             "guidance: StableDiffusion samples each image on its own; for one control image per "
                             "prompt build the transform with t2i_adapter(..., per_image=True)")
        return Residuals(intra=tuple(tile_batch(f, x.shape[0]) for f in features))


def control_image(image: Any) -> np.ndarray:
    """A control image as the adapter reads it: (B, H, W, C) float32 in [0, 1].

    PIL images become [0, 1] (grayscale ones one channel), as diffusers' pipeline converts them (without its
    resize: a wrong size is an error); arrays (H, W, C) or (B, H, W, C) are taken as given; a list is stacked.
    """
    if isinstance(image, (list, tuple)):
        return np.concatenate([control_image(im) for im in image])
    if hasattr(image, "convert"):  # PIL
        arr = np.asarray(image, np.float32) / 255.0
        arr = arr[..., None] if arr.ndim == 2 else arr
        return arr[None]
    arr = np.asarray(image, np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"a control image must be (H, W, C) or (B, H, W, C) NHWC, got shape {arr.shape}")
    return arr


def _apply(model: PureModel, image: Array) -> tuple[Array, ...]:
    return model(image)


_features_jit = jax.jit(_apply)


def _pure(adapter: Any) -> PureModel:
    return adapter if isinstance(adapter, PureModel) else PureModel.of(adapter)


def adapter_features(adapter: Any, image: Any) -> tuple[Array, ...]:
    """One adapter's features of a control image (a ``T2IAdapter`` or its :class:`PureModel`); one compile per shape."""
    model = _pure(adapter)
    module = model.module()
    if not isinstance(module, T2IAdapter):
        raise TypeError(f"expected a T2IAdapter, got {type(module).__name__}")
    img = control_image(image)
    module.check_image(img.shape)
    return _features_jit(model, jnp.asarray(img))


def _is_features(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(hasattr(a, "shape") and hasattr(a, "ndim") for a in x)


def t2i_adapter(adapter_or_features: Any, image: Any = None, scale: Any = 1.0, *, per_image: bool = False) -> Transform:
    """Network transform adding T2I-Adapter features inside the U-Net's down blocks (diffusers'
    ``StableDiffusionAdapterPipeline``: ``down_intrablock_additional_residuals``).

    ``adapter_or_features``: a :class:`T2IAdapter` (or its :class:`PureModel`) with ``image`` its control image;
    a :class:`MultiAdapter` or a list of adapters with ``image`` a list, one per adapter; or precomputed
    features (a tuple of NHWC maps, one per down block), or a list of such tuples (several adapters).
    The features are computed here, once per control image, never per sampling step.
    ``scale``: ``adapter_conditioning_scale``: for one adapter a number, the side
    network's traced scale; for several, one number or one per adapter (what diffusers' MultiAdapter takes
    as ``adapter_weights``), summed in here. Either way a new scale or control image compiles nothing.
    A batch of 1 control image serves every image; a batch of B is tiled over the network batch, or with
    ``per_image`` gives prompt ``i`` of a Stable Diffusion call image ``i`` (:class:`PerImage`).
    """
    factor = 0
    if _is_features(adapter_or_features):
        per_adapter = [tuple(adapter_or_features)]
        if image is not None:
            raise ValueError("precomputed features take no image")
    elif isinstance(adapter_or_features, (list, tuple)) and all(_is_features(f) for f in adapter_or_features):
        per_adapter = [tuple(f) for f in adapter_or_features]
        if image is not None:
            raise ValueError("precomputed features take no image")
    else:
        if image is None:
            raise ValueError("give the control image: t2i_adapter(adapter, image, scale)")
        adapters = adapter_or_features
        if isinstance(adapters, MultiAdapter):
            adapters = list(adapters.adapters)
        multi = isinstance(adapters, (list, tuple))
        adapters = list(adapters) if multi else [adapters]
        images = list(image) if multi and isinstance(image, (list, tuple)) else [image]
        if len(images) != len(adapters):
            raise ValueError(f"give one control image per adapter: {len(adapters)} adapters, {len(images)} images")
        per_adapter = [adapter_features(a, im) for a, im in zip(adapters, images)]
        factor = _pure(adapters[0]).module().config.downscale_factor
    wrap = (lambda fs: tuple(PerImage(f) for f in fs)) if per_image else tuple
    if len(per_adapter) == 1:
        return side_network(AdapterFeatures(wrap(per_adapter[0]), factor), scale)
    summed = _weighted_sum(_stack(per_adapter), _weights(scale, len(per_adapter)))
    return side_network(AdapterFeatures(wrap(summed), factor), 1.0)
