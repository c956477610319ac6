"""Pixel-space U-Net of DDPM (Ho et al. 2020) and its class-conditional variants, NHWC.

Architecture-compatible with diffusers' ``UNet2DModel``: residual stages with optional spatial
self-attention, a sinusoidal time embedding, and class conditioning through an embedding table
added to the time embedding (``num_class_embeds``). ``resnet_time_scale_shift="scale_shift"``
gives the adaptive group norm of Dhariwal & Nichol (2021, "Diffusion Models Beat GANs");
``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` resample inside residual blocks (their
BigGAN-style up/down blocks), as unCLIP's super-resolution U-Nets do (Ramesh et al. 2022).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models import attention_control
from jaxdiff.models.layers import (
    DownBlock,
    Downsample2D,
    Maker,
    MidBlock,
    ResnetBlock2D,
    UpBlock,
    Upsample2D,
    check_block_types,
    config_from_dict,
    spatial_attention,
    TimestepEmbedding,
)
from jaxdiff.models.unet import build_class_embedding, embed_time_and_class

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()

_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")


def rename_torch_key(key: str) -> str:
    """Old diffusers attention names (``query``/``key``/``value``/``proj_attn``) -> current ones."""
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                     (".proj_attn.", ".to_out.0.")):
        if ".attentions." in key and old in key:
            return key.replace(old, new)
    return key


@dataclass(frozen=True)
class UNet2DConfig:
    """The ``config.json`` keys of diffusers' ``UNet2DModel`` that jaxdiff supports.

    ``attention_head_dim`` is the size of one head (``None``: one head over all channels); a block
    of ``c`` channels has ``c // attention_head_dim`` heads, whether or not it divides ``c``.
    """

    sample_size: int | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D",) + ("AttnDownBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet2DConfig":
        cfg = config_from_dict(cls, dict(d))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_block_types(self, "down_block_types", _DOWN_TYPES, "UNet2DModel")
        check_block_types(self, "up_block_types", _UP_TYPES, "UNet2DModel")
        if self.mid_block_type not in ("UNetMidBlock2D", None):
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; use 'UNetMidBlock2D' or null")
        if self.time_embedding_type != "positional":
            raise ValueError("only time_embedding_type='positional' is supported")
        if self.class_embed_type not in (None, "timestep", "identity"):
            raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError("resnet_time_scale_shift must be 'default' or 'scale_shift'")
        if self.downsample_type not in ("conv", "resnet") or self.upsample_type not in ("conv", "resnet"):
            raise ValueError("downsample_type / upsample_type must be 'conv' or 'resnet'")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


class _Blocks:
    """Factories for one configuration (keeps the builders short)."""

    def __init__(self, cfg: UNet2DConfig, mk: Maker):
        self.cfg, self.mk = cfg, mk

    def resnet(self, cin: int, cout: int, scale: float = 1.0, **kw: Any) -> ResnetBlock2D:
        c = self.cfg
        return ResnetBlock2D(cin, cout, self.mk, temb_channels=c.time_embed_dim, groups=c.norm_num_groups,
                             eps=c.norm_eps, act_fn=c.act_fn, time_embedding_norm=c.resnet_time_scale_shift,
                             output_scale_factor=scale, **kw)

    def attention(self, channels: int, groups: int | None, scale: float = 1.0):
        return spatial_attention(channels, self.mk, head_dim=self.cfg.attention_head_dim or channels,
                                 groups=groups, eps=self.cfg.norm_eps, rescale_output_factor=scale)

    def down(self, c: int, kind: str) -> nnx.Module:
        if self.cfg.downsample_type == "resnet" or kind == "ResnetDownsampleBlock2D":
            return self.resnet(c, c, down=True)
        return Downsample2D(c, self.mk, out_channels=c, padding=self.cfg.downsample_padding)

    def up(self, c: int, kind: str) -> nnx.Module:
        if self.cfg.upsample_type == "resnet" or kind == "ResnetUpsampleBlock2D":
            return self.resnet(c, c, up=True)
        return Upsample2D(c, self.mk)


def _build(cfg: UNet2DConfig, b: _Blocks) -> tuple[list[DownBlock], MidBlock | None, list[UpBlock]]:
    chans, layers = cfg.block_out_channels, cfg.layers_per_block
    downs, cin = [], chans[0]
    for i, kind in enumerate(cfg.down_block_types):
        cout = chans[i]
        resnets = [b.resnet(cin if j == 0 else cout, cout) for j in range(layers)]
        attns = [b.attention(cout, cfg.norm_num_groups) for _ in range(layers)] if kind == "AttnDownBlock2D" else None
        downs.append(DownBlock(resnets, attns, [b.down(cout, kind)] if i < len(chans) - 1 else None))
        cin = cout

    mid = None
    if cfg.mid_block_type is not None:
        c, s = chans[-1], cfg.mid_block_scale_factor
        groups = cfg.attn_norm_num_groups or (cfg.norm_num_groups if cfg.resnet_time_scale_shift == "default" else None)
        attns = [b.attention(c, groups, s)] if cfg.add_attention else None
        mid = MidBlock([b.resnet(c, c, s), b.resnet(c, c, s)], attns)

    rchans = tuple(reversed(chans))
    ups, prev = [], rchans[0]
    for i, kind in enumerate(cfg.up_block_types):
        cout, cskip_last = rchans[i], rchans[min(i + 1, len(rchans) - 1)]
        resnets = [b.resnet((prev if j == 0 else cout) + (cskip_last if j == layers else cout), cout)
                   for j in range(layers + 1)]
        attns = [b.attention(cout, cfg.norm_num_groups) for _ in range(layers + 1)] if kind == "AttnUpBlock2D" else None
        ups.append(UpBlock(resnets, attns, [b.up(cout, kind)] if i < len(rchans) - 1 else None))
        prev = cout
    return downs, mid, ups


class UNet2DModel(nnx.Module):
    """Unconditional or class-conditional pixel U-Net; diffusers' ``UNet2DModel`` forward in NHWC."""

    def __init__(self, config: UNet2DConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        mk = Maker(rngs, dtype, param_dtype)
        c0 = config.block_out_channels[0]
        self.conv_in = mk.conv(config.in_channels, c0, 3)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim, mk, "silu")
        self.class_embedding = build_class_embedding(config, mk, "silu")  # diffusers' default activation here
        downs, mid, ups = _build(config, _Blocks(config, mk))
        self.down_blocks = nnx.List(downs)
        self.mid_block = mid
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = mk.group_norm(c0, config.norm_num_groups, config.norm_eps)
        self.conv_out = mk.conv(c0, config.out_channels, 3)
        attention_control.assign_sites(self)

    def __call__(self, sample: Array, timesteps: Any, class_labels: Array | None = None, *, control: Any = None,
                 return_records: bool = False) -> Any:
        """(B, H, W, in_channels) images, timesteps (scalar or (B,)), labels (B,) int -> (B, H, W, out).

        ``control`` / ``return_records``: attention control of the self-attention layers, as for
        :class:`jaxdiff.models.unet.UNet2DConditionModel` (:mod:`jaxdiff.models.attention_control`)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC with {cfg.in_channels} channels, got shape {sample.shape}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"image height and width must be multiples of {factor}, got {sample.shape[1:3]}")
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        emb = embed_time_and_class(self, timesteps, x.shape[0], class_labels)
        run = attention_control.start(control)
        x = self.conv_in(x)
        skips: tuple[Array, ...] = (x,)
        for block in self.down_blocks:
            x, res = block(x, emb, control=run)
            skips += res
        if self.mid_block is not None:
            x = self.mid_block(x, emb, control=run)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            x = block(x, res, emb, control=run)
        return attention_control.finish(self.conv_out(jax.nn.silu(self.conv_norm_out(x))), run, return_records)


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> UNet2DModel:
    """Build the pixel U-Net abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    return build_from_tensors(UNet2DModel, UNet2DConfig, config_dict, tensors, rename=rename_torch_key,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)
