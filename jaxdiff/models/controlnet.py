"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"), NHWC.

Architecture-compatible with diffusers' ``ControlNetModel``: a trainable copy of the U-Net's
encoder and mid block, fed with ``conv_in(x) + controlnet_cond_embedding(image)``, whose every
skip connection and mid output pass through a zero-initialised 1x1 convolution. The result is a
:class:`jaxdiff.conditioning.Residuals` (``down``, ``mid``) for
:class:`jaxdiff.models.unet.UNet2DConditionModel`. :class:`ControlNetSide` makes a ControlNet a side
network of :func:`jaxdiff.conditioning.side_network`, a network transform inside guidance.
:func:`controlnet` runs one or several ControlNets as diffusers' pipelines do (per-net scales and active
intervals as traced values, guess mode); :mod:`jaxdiff.pipelines.controlnet` fits it to the SD recipe.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform
from jaxdiff.conditioning import (PerImage, Residuals, StepIndex, add_residuals, conditional_flag, per_image_value,
                                  tile_batch)
from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models import attention_control
from jaxdiff.models._pure import PureModel
from jaxdiff.models.layers import Maker, TimestepEmbedding, config_from_dict
from jaxdiff.models.unet import (
    UNet2DConditionConfig,
    build_class_embedding,
    build_down_blocks,
    build_mid_block,
    embed_time_and_class,
    encode,
)

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()


@dataclass(frozen=True)
class ControlNetConfig(UNet2DConditionConfig):
    """diffusers ``ControlNetModel`` config: the U-Net encoder's keys plus the conditioning ones."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def validate(self) -> None:
        """Raise a ValueError naming any unsupported setting (ControlNet has no up blocks)."""
        self.validate_encoder()
        self.check_stable_diffusion_encoder("ControlNet")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError("only mid_block_type='UNetMidBlock2DCrossAttn' is supported for ControlNet")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("controlnet_conditioning_channel_order must be 'rgb' or 'bgr'")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError("ControlNet needs a single int cross_attention_dim")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ControlNetConfig":
        cfg = config_from_dict(cls, dict(d))
        cfg.validate()
        return cfg

    @property
    def cond_downscale(self) -> int:
        """Conditioning image size / latent size."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nnx.Module):
    """Small conv encoder of the control image down to latent resolution; ``conv_out`` starts at zero."""

    def __init__(self, out_channels: int, cond_channels: int, channels: tuple[int, ...], mk: Maker):
        self.conv_in = mk.conv(cond_channels, channels[0], 3)
        blocks = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            blocks += [mk.conv(cin, cin, 3), mk.conv(cin, cout, 3, stride=2, padding=1)]
        self.blocks = nnx.List(blocks)
        self.conv_out = mk.conv(channels[-1], out_channels, 3, zero=True)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.silu(self.conv_in(x))
        for conv in self.blocks:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(nnx.Module):
    """``__call__(sample, t, text, image) -> Residuals(down=..., mid=...)``, all NHWC."""

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        mk = Maker(rngs, dtype, param_dtype)
        chans = config.block_out_channels
        self.conv_in = mk.conv(config.in_channels, chans[0], 3)
        self.time_embedding = TimestepEmbedding(chans[0], config.time_embed_dim, mk, config.act_fn)
        self.class_embedding = build_class_embedding(config, mk)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chans[0], config.conditioning_channels, config.conditioning_embedding_out_channels, mk)
        self.down_blocks = nnx.List(build_down_blocks(config, mk))
        self.mid_block = build_mid_block(config, mk)
        zero_convs = [mk.conv(chans[0], chans[0], 1, zero=True)]
        layers = config.per_block("layers_per_block")
        for i, c in enumerate(chans):
            zero_convs += [mk.conv(c, c, 1, zero=True) for _ in range(layers[i] + (i < len(chans) - 1))]
        self.controlnet_down_blocks = nnx.List(zero_convs)
        self.controlnet_mid_block = mk.conv(chans[-1], chans[-1], 1, zero=True)
        attention_control.assign_sites(self)

    def __call__(self, sample: Array, timesteps: Any, encoder_hidden_states: Array, controlnet_cond: Array,
                 conditioning_scale: Any = 1.0, *, class_labels: Array | None = None,
                 guess_mode: bool = False, residuals: Residuals | None = None, control: Any = None,
                 return_records: bool = False) -> Any:
        """Latents (B, h, w, C), timesteps, text (B, L, D), control image (B, h*f, w*f, cond_channels).

        ``conditioning_scale`` multiplies every residual (a traced value: changing it does not
        recompile); ``guess_mode`` scales them geometrically from 0.1 (first) to 1 (mid), as diffusers.
        ``residuals`` act on the ControlNet's copy of the U-Net encoder exactly as on the U-Net's own
        (:func:`jaxdiff.models.unet.encode`): intra-block features (a T2I-Adapter's) enter its down
        blocks and so shape everything after them; ``down`` / ``mid`` are added to the skips and mid
        output that the zero convolutions read. diffusers' ControlNet has no such input.
        ``control`` / ``return_records``: attention control, as for the U-Net (``return_records=True``
        returns ``(residuals, records)``).
        """
        cfg = self.config
        f = cfg.cond_downscale
        want = (sample.shape[1] * f, sample.shape[2] * f)
        if controlnet_cond.ndim != 4 or tuple(controlnet_cond.shape[1:3]) != want:
            raise ValueError(f"controlnet_cond must be NHWC of size {want} ({f}x the latents), "
                             f"got shape {controlnet_cond.shape}; resize the control image to the generated "
                             "image's size (jaxdiff.pipelines.controlnet.prepare_control_image does, as diffusers)")
        if controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"controlnet_cond must have {cfg.conditioning_channels} channels (this ControlNet's "
                             f"conditioning_channels), got {controlnet_cond.shape[-1]}; convert the control image")
        cond = controlnet_cond.astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        emb = embed_time_and_class(self, timesteps, sample.shape[0], class_labels)
        context = encoder_hidden_states.astype(self.dtype)
        run = attention_control.start(control)

        x = self.conv_in(sample.astype(self.dtype)) + self.controlnet_cond_embedding(cond)
        x, skips = encode(self, x, emb, context, residuals, run)

        downs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        scale = jnp.asarray(conditioning_scale, self.dtype)
        if guess_mode and not cfg.global_pool_conditions:
            scales = scale * jnp.asarray(np.logspace(-1, 0, len(downs) + 1), self.dtype)
            downs, mid = [d * scales[i] for i, d in enumerate(downs)], mid * scales[-1]
        else:
            downs, mid = [d * scale for d in downs], mid * scale
        if cfg.global_pool_conditions:
            downs = [d.mean(axis=(1, 2), keepdims=True) for d in downs]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return attention_control.finish(Residuals(down=tuple(downs), mid=mid), run, return_records)


@pytree_dataclass
class ControlNetSide:
    """A ControlNet as a side network ``side(x, t, cond) -> Residuals`` for :func:`jaxdiff.conditioning.side_network`.

    Reads ``cond["context"]`` (and ``cond["class_labels"]`` when present); ``image`` (B, H, W, c), the
    control image (or a :class:`jaxdiff.conditioning.PerImage` of one per prompt, which the SD recipe hands
    each image), is tiled over the network batch (classifier-free guidance doubles it). The
    residuals come unscaled (``conditioning_scale`` 1): the side network's ``scale`` scales them.
    ``guess_mode`` gives diffusers' geometric per-skip scales; with
    ``side_network(..., conditional_only=True)`` it is diffusers' guess mode, in which the
    unconditional half of classifier-free guidance gets no control.
    """

    model: PureModel
    image: Any
    guess_mode: bool = static_field(default=False)

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Residuals:
        image = tile_batch(jnp.asarray(per_image_value(self.image)), x.shape[0])
        return self.model(x, t, cond["context"], image, 1.0, class_labels=cond.get("class_labels"),
                          guess_mode=self.guess_mode)


_SHARED_WITH_UNET = ("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block")


def controlnet_from_unet(unet: nnx.Module, *, rngs: nnx.Rngs, conditioning_channels: int = 3,
                         conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                         controlnet_conditioning_channel_order: str = "rgb") -> ControlNetModel:
    """A new ControlNet whose encoder copies ``unet``'s weights (diffusers ``ControlNetModel.from_unet``).

    The zero convolutions start at zero, so the controlled U-Net initially equals ``unet``.
    """
    fields = {f.name: getattr(unet.config, f.name) for f in dataclasses.fields(UNet2DConditionConfig)}
    cfg = ControlNetConfig(**fields, conditioning_channels=conditioning_channels,
                           conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                           controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
    model = ControlNetModel(cfg, rngs=rngs, dtype=unet.dtype)
    for name in _SHARED_WITH_UNET:
        source = getattr(unet, name)
        if source is not None:
            nnx.update(getattr(model, name), jax.tree.map(jnp.copy, nnx.state(source)))
    return model


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> ControlNetModel:
    """Build the ControlNet abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    return build_from_tensors(ControlNetModel, ControlNetConfig, config_dict, tensors,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)


# ---- several ControlNets with per-net scales and active intervals, as diffusers' pipelines run them ------------

def interval_keep(step: StepIndex, starts: Array, ends: Array) -> Array:
    """diffusers' ``controlnet_keep``: 1 where step ``i`` (counted from the run's first step: ``n`` steps run) has
    ``i / n >= start`` and ``(i + 1) / n <= end``, else 0; one entry per ControlNet. diffusers counts the steps
    that actually run (image-to-image runs the last ``count - first``); the sampling runner sets all three."""
    if step.count is None:
        raise ValueError("a ControlNet interval needs the step count: run the network inside jaxdiff's sampling "
                         "loop (which sets it), or pass steps= (and first_step=) to controlnet()")
    i = (step.value - step.first).astype(jnp.float32)
    n = (step.count - step.first).astype(jnp.float32)
    off = (i / n < starts) | ((i + 1.0) / n > ends)
    return 1.0 - off.astype(jnp.float32)


@pytree_dataclass
class ControlNets:
    """``inner(x, t, cond + sum_k scale_k * keep_k(step) * controlnet_k(x, t, cond, image_k))``.

    One or several ControlNets (diffusers' ``MultiControlNetModel``: their residuals sum), each with its
    own control image (B or 1, H, W, c) in [0, 1], tiled over the network batch (classifier-free guidance
    doubles it), its conditioning scale and its active interval ``[start, end)`` as fractions of the run's
    steps (:func:`interval_keep`), all traced: new scales, intervals, images, steps or strengths reuse the
    compiled program. ``guess_mode`` (static; forced by any net's ``global_pool_conditions``, as diffusers
    forces it by the first net's) scales each net's residuals by ``logspace(-1, 0, n)`` from the first skip
    to the mid block and gives them to the conditional rows of classifier-free guidance only
    (``cond["conditional"]``): diffusers runs the ControlNets on the conditional half and hands the
    unconditional half zeros, which is the same thing for per-sample networks.
    """

    inner: Any
    sides: tuple  # one ControlNetSide (net, control image, guess mode) per ControlNet
    scales: Array
    starts: Array
    ends: Array
    step: StepIndex
    guess_mode: bool = static_field(default=False)

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        batch = x.shape[0]
        keep = interval_keep(self.step, self.starts, self.ends)
        weights = jnp.asarray(self.scales, jnp.float32) * keep
        flag = conditional_flag(cond, batch).astype(jnp.float32) if self.guess_mode else None
        total = None
        for k, side in enumerate(self.sides):
            scale = weights[k] if flag is None else weights[k] * flag
            res = side(x, t, cond).scaled(scale)
            total = res if total is None else total + res
        return self.inner(x, t, add_residuals(cond, total))


def _per_net(value: Any, n: int, what: str) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(items) != n:
        raise ValueError(f"got {len(items)} {what} for {n} ControlNets; give one value, or one per ControlNet")
    return items


def check_interval(starts: Sequence[float], ends: Sequence[float]) -> None:
    """diffusers' checks on ``control_guidance_start`` / ``control_guidance_end``, one clear line each."""
    for k, (s, e) in enumerate(zip(starts, ends)):
        if not 0.0 <= float(s) < float(e) <= 1.0:
            raise ValueError(f"ControlNet {k}: the active interval needs 0 <= start < end <= 1, got start {float(s):g} "
                             f"and end {float(e):g}; give control_guidance_start below control_guidance_end")


def _as_pure(model: Any) -> PureModel:
    if isinstance(model, PureModel):
        return model
    if isinstance(model, ControlNetModel):
        return PureModel.of(model)
    raise TypeError(f"expected a ControlNetModel (or PureModel.of one), got {type(model).__name__}")


def model_config(model: Any) -> ControlNetConfig:
    """The config of a ControlNetModel or of a PureModel holding one."""
    module = model.module() if isinstance(model, PureModel) else model
    if not isinstance(module, ControlNetModel):
        raise TypeError(f"expected a ControlNetModel (or PureModel.of one), got {type(module).__name__}")
    return module.config


def controlnet(models: Any, images: Any, scale: Any = 1.0, start: Any = 0.0, end: Any = 1.0, *,
               guess_mode: bool = False, steps: Any = None, first_step: Any = 0, per_image: bool = False) -> Transform:
    """Network transform running one or several ControlNets (see :class:`ControlNets`).

    ``models``: a ControlNetModel (or ``PureModel``) or a list; ``images``: one prepared control image
    (B or 1, H, W, c) in [0, 1] per net (:func:`jaxdiff.pipelines.controlnet.prepare_control_image` resizes
    as diffusers); ``scale`` (``controlnet_conditioning_scale``), ``start`` / ``end``
    (``control_guidance_start`` / ``_end``): one value for all nets or one per net. ``steps`` /
    ``first_step``: the run's step count and first step, for calling the network outside jaxdiff's sampling
    loop (which sets them at every step). ``per_image``: the
    control images (B, H, W, c) are one per prompt of a Stable Diffusion call (:class:`PerImage`), not a batch
    tiled over the network batch.
    """
    many = isinstance(models, (list, tuple))
    models = [_as_pure(m) for m in (models if many else [models])]
    n = len(models)
    if n == 0:
        raise ValueError("give at least one ControlNet")
    if many != isinstance(images, (list, tuple)) or (many and len(images) != n):
        got = len(images) if isinstance(images, (list, tuple)) else "one image (not a list)"
        raise ValueError(f"got {got} control images for {n} ControlNets; give a list with one image per ControlNet")
    images = list(images) if many else [images]
    for k, (m, image) in enumerate(zip(models, images)):
        cfg = model_config(m)
        shape = np.shape(image)
        if len(shape) != 4 or shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"control image {k} must be (B, H, W, {cfg.conditioning_channels}) in [0, 1], got shape "
                             f"{shape}; prepare it with jaxdiff.pipelines.controlnet.prepare_control_image")
    scales, starts, ends = (_per_net(v, n, what) for v, what in ((scale, "conditioning scales"),
                                                                 (start, "control_guidance_start values"),
                                                                 (end, "control_guidance_end values")))
    try:
        bounds = [float(v) for v in starts], [float(v) for v in ends]
    except (TypeError, jax.errors.ConcretizationTypeError):
        bounds = None  # traced bounds (a controlnet() built inside jit): nothing to check here
    if bounds is not None:
        check_interval(*bounds)
    guess = bool(guess_mode) or any(model_config(m).global_pool_conditions for m in models)
    wrap = PerImage if per_image else (lambda a: a)
    sides = tuple(ControlNetSide(m, wrap(jnp.asarray(i, jnp.float32)), guess) for m, i in zip(models, images))
    params = dict(sides=sides, scales=jnp.asarray(scales, jnp.float32).reshape(n),
                  starts=jnp.asarray(starts, jnp.float32).reshape(n),
                  ends=jnp.asarray(ends, jnp.float32).reshape(n), step=StepIndex(first_step, first_step, steps))
    return Transform(ControlNets, params, (("guess_mode", guess),))
