"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), NHWC.

Architecture-compatible with diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE): the encoder
maps an image in [-1, 1] to a diagonal Gaussian over latents (mean, log-variance), the decoder
maps latents back. The latent ``scaling_factor`` (0.18215 for SD 1/2) is NOT applied inside
:meth:`AutoencoderKL.encode` / :meth:`AutoencoderKL.decode`, exactly as in diffusers: multiply
encoder samples by it before diffusion, divide by it before decoding.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models.layers import (
    DownBlock,
    Downsample2D,
    Maker,
    MidBlock,
    ResnetBlock2D,
    UpBlock,
    Upsample2D,
    activation,
    config_from_dict,
    spatial_attention,
)
from jaxdiff.models.unet2d import rename_torch_key as _rename_attention

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()
_EPS = 1e-6  # diffusers hard-codes the VAE's norm epsilon


def rename_torch_key(key: str) -> str:
    """Checkpoints saved before diffusers 0.14 name the mid-block attention ``query/key/value/proj_attn``."""
    return _rename_attention(key)


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """The ``config.json`` keys of diffusers' ``AutoencoderKL`` that jaxdiff supports."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        cfg = config_from_dict(cls, dict(d))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or set(self.up_block_types) != {"UpDecoderBlock2D"}:
            raise ValueError("AutoencoderKL supports only DownEncoderBlock2D / UpDecoderBlock2D blocks")

    @property
    def downscale(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.block_out_channels) - 1)


def _resnet(cfg: AutoencoderKLConfig, cin: int, cout: int, mk: Maker) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, mk, temb_channels=None, groups=cfg.norm_num_groups, eps=_EPS, act_fn=cfg.act_fn)


def _mid(cfg: AutoencoderKLConfig, mk: Maker) -> MidBlock:
    c = cfg.block_out_channels[-1]
    attn = [spatial_attention(c, mk, head_dim=c, groups=cfg.norm_num_groups, eps=_EPS)]
    return MidBlock([_resnet(cfg, c, c, mk), _resnet(cfg, c, c, mk)], attn if cfg.mid_block_add_attention else None)


class Encoder(nnx.Module):
    """diffusers ``Encoder``: conv_in, down_blocks, mid_block, conv_norm_out, conv_out (2x latents)."""

    def __init__(self, cfg: AutoencoderKLConfig, mk: Maker):
        chans = cfg.block_out_channels
        self.act = activation(cfg.act_fn)
        self.conv_in = mk.conv(cfg.in_channels, chans[0], 3)
        blocks, cin = [], chans[0]
        for i, cout in enumerate(chans):
            resnets = [_resnet(cfg, cin if j == 0 else cout, cout, mk) for j in range(cfg.layers_per_block)]
            down = [Downsample2D(cout, mk, out_channels=cout, padding=0)] if i < len(chans) - 1 else None
            blocks.append(DownBlock(resnets, None, down))
            cin = cout
        self.down_blocks = nnx.List(blocks)
        self.mid_block = _mid(cfg, mk)
        self.conv_norm_out = mk.group_norm(chans[-1], cfg.norm_num_groups, _EPS)
        self.conv_out = mk.conv(chans[-1], 2 * cfg.latent_channels, 3)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers ``Decoder``: conv_in, mid_block, up_blocks, conv_norm_out, conv_out."""

    def __init__(self, cfg: AutoencoderKLConfig, mk: Maker):
        rchans = tuple(reversed(cfg.block_out_channels))
        self.act = activation(cfg.act_fn)
        self.conv_in = mk.conv(cfg.latent_channels, rchans[0], 3)
        self.mid_block = _mid(cfg, mk)
        blocks, cin = [], rchans[0]
        for i, cout in enumerate(rchans):
            resnets = [_resnet(cfg, cin if j == 0 else cout, cout, mk) for j in range(cfg.layers_per_block + 1)]
            up = [Upsample2D(cout, mk, out_channels=cout)] if i < len(rchans) - 1 else None
            blocks.append(UpBlock(resnets, None, up))
            cin = cout
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = mk.group_norm(rchans[-1], cfg.norm_num_groups, _EPS)
        self.conv_out = mk.conv(rchans[-1], cfg.out_channels, 3)

    def __call__(self, z: Array) -> Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Stable Diffusion's VAE. ``encode(x) -> (mean, logvar)``, ``decode(z) -> x`` (NHWC)."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        mk = Maker(rngs, dtype, param_dtype)
        lat = config.latent_channels
        self.encoder = Encoder(config, mk)
        self.decoder = Decoder(config, mk)
        self.quant_conv = mk.conv(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = mk.conv(lat, lat, 1) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def _check(self, x: Array, channels: int, multiple: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {x.shape}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple} "
                             f"(2 ** (len(block_out_channels) - 1)), got {x.shape[1:3]}; resize or crop it")

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Image (B, H, W, C) in [-1, 1] -> (mean, logvar) of the latent posterior, (B, H/f, W/f, latent).

        The log-variance is clamped to [-30, 20] as in diffusers' ``DiagonalGaussianDistribution``.
        Sample with ``mean + exp(logvar / 2) * noise``; the scaling factor is not applied.
        """
        self._check(x, self.config.in_channels, self.config.downscale, "image")
        h = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Latents (B, h, w, latent_channels), unscaled -> image (B, h*f, w*f, out_channels)."""
        self._check(z, self.config.latent_channels, 1, "latents")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(x)[0])


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> AutoencoderKL:
    """Build the VAE abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    return build_from_tensors(AutoencoderKL, AutoencoderKLConfig, config_dict, tensors, rename=rename_torch_key,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)
