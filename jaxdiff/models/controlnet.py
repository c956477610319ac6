"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"), NHWC.

Architecture-compatible with diffusers' ``ControlNetModel``: a trainable copy of the U-Net's
encoder and mid block, fed with ``conv_in(x) + controlnet_cond_embedding(image)``, whose every
skip connection and mid output pass through a zero-initialised 1x1 convolution. The result is a
:class:`jaxdiff.conditioning.Residuals` (``down``, ``mid``) for
:class:`jaxdiff.models.unet.UNet2DConditionModel`. :class:`ControlNetSide` makes a ControlNet a side
network of :func:`jaxdiff.conditioning.side_network`, a network transform inside guidance.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.conditioning import Residuals, tile_batch
from jaxdiff.convert.torch_layout import abstract, load_torch_tensors
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
                             f"got shape {controlnet_cond.shape}")
        if controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"controlnet_cond must have {cfg.conditioning_channels} channels")
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
    control image, is tiled over the network batch (classifier-free guidance doubles it). The
    residuals come unscaled (``conditioning_scale`` 1): the side network's ``scale`` scales them.
    ``guess_mode`` gives diffusers' geometric per-skip scales; with
    ``side_network(..., conditional_only=True)`` it is diffusers' guess mode, in which the
    unconditional half of classifier-free guidance gets no control.
    """

    model: PureModel
    image: Array
    guess_mode: bool = static_field(default=False)

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Residuals:
        image = tile_batch(jnp.asarray(self.image), x.shape[0])
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
    cfg = ControlNetConfig.from_dict(config_dict)
    model = abstract(lambda: ControlNetModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return load_torch_tensors(model, tensors, ignore=IGNORED_TORCH_KEYS, dtype=param_dtype)
