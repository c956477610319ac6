"""Space-time factorised conditional 3-D U-Net (video latents), channels last.

Architecture-compatible with diffusers' ``UNet3DConditionModel`` (ModelScope text-to-video, Wang et al.
2023; the factorisation of Ho et al. 2022, "Video Diffusion Models", Sec. 3): every stage runs the
2-D layers of the image U-Net on each frame (``ResnetBlock2D``, ``Transformer2DModel``, the resamplers)
and, after each of them, a layer that mixes frames only (:class:`TemporalConvLayer` after each resnet,
:class:`TransformerTemporalModel` after each spatial transformer, and ``transformer_in`` after ``conv_in``).

Input is (B, F, H, W, C) (diffusers takes (B, C, F, H, W)). ``temporal=False`` skips every temporal
layer, so each frame is an independent image through the same weights (joint image-video training,
Ho et al. 2022 Sec. 3: "masking" the temporal attention). Parameter names mirror diffusers, so its
checkpoints load with :func:`from_pretrained_tensors` or ``jaxdiff.convert.load_model_folder``.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models import attention_control
from jaxdiff.models.layers import (
    Downsample2D,
    Maker,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    activation,
    check_block_types,
    config_from_dict,
    per_block,
    timestep_embedding,
)
from jaxdiff.models.layers.temporal import TemporalConvLayer, TransformerTemporalModel, per_frame

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()

_DOWN_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
_UP_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")
# diffusers builds transformer_in with 8 heads whatever the config says.
TRANSFORMER_IN_HEADS = 8


@dataclass(frozen=True)
class UNet3DConditionConfig:
    """The ``config.json`` keys of diffusers' ``UNet3DConditionModel``.

    As in diffusers, ``attention_head_dim`` is the width of each attention head: a block of ``C``
    channels has ``C // attention_head_dim`` heads (spatial and temporal), and ``transformer_in`` has 8
    heads of ``attention_head_dim``. Every spatial transformer uses a Linear ``proj_in`` (diffusers'
    3-D block factories default ``use_linear_projection`` to True).
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int | tuple[int, ...] = 64
    num_attention_heads: int | tuple[int, ...] | None = None
    time_cond_proj_dim: int | None = None
    temporal_relative_positions: int | None = None
    """jaxdiff option (not a diffusers key): ``M > 0`` gives every temporal attention (``transformer_in`` and
    ``temp_attentions``) a learned relative position bias over frame offsets clipped to ``[-M, M]`` (Ho et al.
    2022 Sec. 3; :class:`~jaxdiff.models.layers.temporal.RelativePositionBias`). ``None``: diffusers' layer."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet3DConditionConfig":
        cfg = config_from_dict(cls, dict(d))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise a ValueError naming any unsupported or inconsistent setting."""
        check_block_types(self, "down_block_types", _DOWN_TYPES, "UNet3DConditionModel")
        check_block_types(self, "up_block_types", _UP_TYPES, "UNet3DConditionModel")
        if self.num_attention_heads is not None:
            raise ValueError("num_attention_heads must be null for UNet3DConditionModel (diffusers refuses it too); "
                             "set the head width with attention_head_dim")
        if not isinstance(self.attention_head_dim, int):
            raise ValueError("attention_head_dim must be one int for UNet3DConditionModel (transformer_in uses it "
                             "as its head width, as diffusers does)")
        if self.norm_num_groups is None:
            raise ValueError("norm_num_groups=null is not supported (diffusers' 3-D blocks need groups); set an int")
        if self.time_cond_proj_dim is not None:
            raise ValueError("time_cond_proj_dim is not supported (LCM's timestep condition); it must be null")
        if not isinstance(self.layers_per_block, int):
            raise ValueError("layers_per_block must be one int for UNet3DConditionModel")
        m = self.temporal_relative_positions
        if m is not None and (not isinstance(m, int) or m < 1):
            raise ValueError(f"temporal_relative_positions must be null or a positive int (the largest frame offset "
                             f"with its own bias), got {m!r}")

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` this config came from (``_class_name`` included), for ``save_pretrained``;
        ``temporal_relative_positions`` only when set (diffusers ignores the key, but not the extra weights)."""
        d = dataclasses.asdict(self)
        if d["temporal_relative_positions"] is None:
            del d["temporal_relative_positions"]
        return {"_class_name": "UNet3DConditionModel", **d}

    def head_dims(self) -> tuple[int, ...]:
        return per_block(self.attention_head_dim, len(self.block_out_channels), "attention_head_dim")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


def _resnet(cfg: UNet3DConditionConfig, cin: int, cout: int, mk: Maker, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, mk, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, act_fn=cfg.act_fn, output_scale_factor=scale)


def _heads(channels: int, head_dim: int) -> int:
    if not 0 < head_dim <= channels:
        raise ValueError(f"attention_head_dim {head_dim} for a {channels}-channel block: a head cannot be wider "
                         "than the block; lower attention_head_dim")
    return channels // head_dim


def _spatial(cfg: UNet3DConditionConfig, channels: int, head_dim: int, mk: Maker) -> Transformer2DModel:
    """diffusers' ``Transformer2DModel(channels // head_dim, head_dim, channels, use_linear_projection=True)``."""
    return Transformer2DModel(_heads(channels, head_dim), head_dim, channels, mk, num_layers=1,
                              cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
                              use_linear_projection=True)


def _temporal(cfg: UNet3DConditionConfig, channels: int, head_dim: int, mk: Maker) -> TransformerTemporalModel:
    return TransformerTemporalModel(_heads(channels, head_dim), head_dim, channels, mk,
                                    norm_num_groups=cfg.norm_num_groups,
                                    relative_positions=cfg.temporal_relative_positions or 0)


def _tconv(cfg: UNet3DConditionConfig, channels: int, mk: Maker) -> TemporalConvLayer:
    return TemporalConvLayer(channels, mk, norm_num_groups=cfg.norm_num_groups)


class Stage3D(nnx.Module):
    """One U-Net stage of diffusers' 3-D blocks: per layer (concatenate a skip, for up stages),
    ``resnets[i]``, ``temp_convs[i]``, then (cross-attention stages) ``attentions[i]`` and
    ``temp_attentions[i]``; then a resampler. ``CrossAttnDownBlock3D`` / ``DownBlock3D`` /
    ``CrossAttnUpBlock3D`` / ``UpBlock3D`` differ only in which of these are present."""

    def __init__(self, resnets: list, temp_convs: list, attentions: list | None = None,
                 temp_attentions: list | None = None, downsamplers: list | None = None,
                 upsamplers: list | None = None):
        self.resnets = nnx.List(resnets)
        self.temp_convs = nnx.List(temp_convs)
        self.attentions = nnx.List(attentions) if attentions else None
        self.temp_attentions = nnx.List(temp_attentions) if temp_attentions else None
        self.downsamplers = nnx.List(downsamplers) if downsamplers else None
        self.upsamplers = nnx.List(upsamplers) if upsamplers else None

    def layer(self, i: int, x: Array, temb: Array, context: Array, frames: int, temporal: bool,
              control: Any) -> Array:
        x = self.resnets[i](x, temb)
        if temporal:
            x = per_frame(self.temp_convs[i], x, frames)
        if self.attentions is not None:
            x = self.attentions[i](x, context, control)
            if temporal:
                x = per_frame(lambda v: self.temp_attentions[i](v, control), x, frames)
        return x

    def down(self, x: Array, temb: Array, context: Array, frames: int, temporal: bool,
             control: Any = None) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context, frames, temporal, control)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)

    def up(self, x: Array, skips: tuple[Array, ...], temb: Array, context: Array, frames: int, temporal: bool,
           upsample_size: tuple[int, int] | None = None, control: Any = None) -> Array:
        skips = list(skips)
        for i in range(len(self.resnets)):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self.layer(i, x, temb, context, frames, temporal, control)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, output_size=upsample_size)
        return x


class MidBlock3D(nnx.Module):
    """diffusers ``UNetMidBlock3DCrossAttn``: resnet, temporal conv, then (spatial transformer, temporal
    transformer, resnet, temporal conv)."""

    def __init__(self, cfg: UNet3DConditionConfig, mk: Maker):
        c, scale, hd = cfg.block_out_channels[-1], cfg.mid_block_scale_factor, cfg.head_dims()[-1]
        self.resnets = nnx.List([_resnet(cfg, c, c, mk, scale), _resnet(cfg, c, c, mk, scale)])
        self.temp_convs = nnx.List([_tconv(cfg, c, mk), _tconv(cfg, c, mk)])
        self.attentions = nnx.List([_spatial(cfg, c, hd, mk)])
        self.temp_attentions = nnx.List([_temporal(cfg, c, hd, mk)])

    def __call__(self, x: Array, temb: Array, context: Array, frames: int, temporal: bool,
                 control: Any = None) -> Array:
        x = self.resnets[0](x, temb)
        if temporal:
            x = per_frame(self.temp_convs[0], x, frames)
        x = self.attentions[0](x, context, control)
        if temporal:
            x = per_frame(lambda v: self.temp_attentions[0](v, control), x, frames)
        x = self.resnets[1](x, temb)
        if temporal:
            x = per_frame(self.temp_convs[1], x, frames)
        return x


def build_down_blocks(cfg: UNet3DConditionConfig, mk: Maker) -> list[Stage3D]:
    chans, hds, n = cfg.block_out_channels, cfg.head_dims(), cfg.layers_per_block
    blocks, cin = [], chans[0]
    for i, kind in enumerate(cfg.down_block_types):
        cout = chans[i]
        resnets = [_resnet(cfg, cin if j == 0 else cout, cout, mk) for j in range(n)]
        tconvs = [_tconv(cfg, cout, mk) for _ in range(n)]
        attns = tattns = None
        if kind == "CrossAttnDownBlock3D":
            attns = [_spatial(cfg, cout, hds[i], mk) for _ in range(n)]
            tattns = [_temporal(cfg, cout, hds[i], mk) for _ in range(n)]
        down = None
        if i < len(chans) - 1:
            down = [Downsample2D(cout, mk, out_channels=cout, padding=cfg.downsample_padding)]
        blocks.append(Stage3D(resnets, tconvs, attns, tattns, downsamplers=down))
        cin = cout
    return blocks


def build_up_blocks(cfg: UNet3DConditionConfig, mk: Maker) -> list[Stage3D]:
    rchans, rhds = tuple(reversed(cfg.block_out_channels)), tuple(reversed(cfg.head_dims()))
    n = cfg.layers_per_block + 1
    blocks, prev = [], rchans[0]
    for i, kind in enumerate(cfg.up_block_types):
        cout, cskip_last = rchans[i], rchans[min(i + 1, len(rchans) - 1)]
        resnets = [_resnet(cfg, (prev if j == 0 else cout) + (cskip_last if j == n - 1 else cout), cout, mk)
                   for j in range(n)]
        tconvs = [_tconv(cfg, cout, mk) for _ in range(n)]
        attns = tattns = None
        if kind == "CrossAttnUpBlock3D":
            attns = [_spatial(cfg, cout, rhds[i], mk) for _ in range(n)]
            tattns = [_temporal(cfg, cout, rhds[i], mk) for _ in range(n)]
        up = [Upsample2D(cout, mk, out_channels=cout)] if i < len(rchans) - 1 else None
        blocks.append(Stage3D(resnets, tconvs, attns, tattns, upsamplers=up))
        prev = cout
    return blocks


def frame_timesteps(timesteps: Any, batch: int, frames: int) -> Array:
    """Timesteps as one per frame, (batch * frames,): a scalar, one per video (B,), or one per frame (B, F)
    (independent noise levels per frame, for joint image-video training with ``temporal=False``)."""
    t = jnp.asarray(timesteps, jnp.float32)
    if t.ndim == 2:
        if t.shape != (batch, frames):
            raise ValueError(f"per-frame timesteps must have shape (batch, frames) = {(batch, frames)}, got {t.shape}")
        return t.reshape(-1)
    if t.ndim > 2 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timesteps must be a scalar, (batch,) = ({batch},) or (batch, frames) = "
                         f"{(batch, frames)}, got shape {t.shape}")
    return jnp.repeat(jnp.broadcast_to(t.reshape(-1), (batch,)), frames)


class UNet3DConditionModel(nnx.Module):
    """Text-conditioned video U-Net; ``__call__`` is diffusers' forward with frames as axis 1, channels last.

    ``control`` is an attention control (:mod:`jaxdiff.models.attention_control`; the temporal attention
    layers are sites too, under ``transformer_in`` and ``*.temp_attentions.*``); ``return_records=True``
    returns ``(out, records)``.
    """

    def __init__(self, config: UNet3DConditionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        mk = Maker(rngs, dtype, param_dtype)
        c0 = config.block_out_channels[0]
        self.conv_in = mk.conv(config.in_channels, c0, 3)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim, mk, config.act_fn)
        self.transformer_in = TransformerTemporalModel(TRANSFORMER_IN_HEADS, config.attention_head_dim, c0, mk,
                                                       norm_num_groups=config.norm_num_groups,
                                                       relative_positions=config.temporal_relative_positions or 0)
        self.down_blocks = nnx.List(build_down_blocks(config, mk))
        self.mid_block = MidBlock3D(config, mk)
        self.up_blocks = nnx.List(build_up_blocks(config, mk))
        self.conv_norm_out = mk.group_norm(c0, config.norm_num_groups, config.norm_eps)
        self.conv_out = mk.conv(c0, config.out_channels, 3)
        self.act = activation("silu")  # diffusers' conv_act is SiLU whatever act_fn is
        attention_control.assign_sites(self)

    def __call__(self, sample: Array, timesteps: Any, encoder_hidden_states: Array, *, num_frames: int | None = None,
                 temporal: bool = True, control: Any = None, return_records: bool = False) -> Any:
        """(B, F, H, W, in_channels) video latents, timesteps (scalar, (B,) or (B, F)), (B, L, D) text
        -> (B, F, H, W, out_channels).

        A 4-D ``sample`` (B*F, H, W, C), videos' frames consecutive, is accepted with ``num_frames`` (output in
        the same layout). ``temporal=False`` (static) skips every temporal layer: the frames are independent
        images through the spatial layers (the same result as each frame alone).
        """
        cfg = self.config
        if not isinstance(temporal, bool):
            raise TypeError(f"temporal must be a Python bool (it is static: it decides which layers run), got "
                            f"{type(temporal).__name__}; under jax.jit close over it or mark it static")
        if sample.ndim == 4 and num_frames is not None:
            if sample.shape[0] % num_frames:
                raise ValueError(f"a (B*F, H, W, C) sample of {sample.shape[0]} frames is not a whole number of "
                                 f"num_frames={num_frames} videos")
            out = self(sample.reshape(-1, num_frames, *sample.shape[1:]), timesteps, encoder_hidden_states,
                       temporal=temporal, control=control, return_records=return_records)
            if return_records:
                return out[0].reshape(-1, *out[0].shape[2:]), out[1]
            return out.reshape(-1, *out.shape[2:])
        if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, F, H, W, C) video latents with C = {cfg.in_channels}, got shape "
                             f"{sample.shape} (or pass (B*F, H, W, C) with num_frames=)")
        b, f, h, w, _ = sample.shape
        if num_frames is not None and num_frames != f:
            raise ValueError(f"num_frames={num_frames} but the sample has {f} frames on axis 1")
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        if context.ndim != 3 or context.shape[0] not in (1, b):
            raise ValueError(f"encoder_hidden_states must be (B, L, D) with B = {b} (or 1), got shape {context.shape}")
        context = jnp.repeat(jnp.broadcast_to(context, (b, *context.shape[1:])), f, axis=0)
        t = frame_timesteps(timesteps, b, f)
        proj = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = self.time_embedding(proj.astype(self.dtype))
        run = attention_control.start(control)

        x = self.conv_in(sample.astype(self.dtype).reshape(b * f, h, w, -1))
        if temporal:
            x = per_frame(lambda v: self.transformer_in(v, run), x, f)
        skips: tuple[Array, ...] = (x,)
        for block in self.down_blocks:
            x, res = block.down(x, emb, context, f, temporal, run)
            skips += res
        x = self.mid_block(x, emb, context, f, temporal, run)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if skips else None  # sizes that do not halve evenly, as diffusers
            x = block.up(x, res, emb, context, f, temporal, size, run)
        x = self.conv_out(self.act(self.conv_norm_out(x)))
        return attention_control.finish(x.reshape(b, f, *x.shape[1:]), run, return_records)


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> UNet3DConditionModel:
    """Build the 3-D U-Net abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    return build_from_tensors(UNet3DConditionModel, UNet3DConditionConfig, config_dict, tensors,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)
