"""Temporal layers of space-time factorised video U-Nets, on (B, F, H, W, C) input (frames as axis 1).

Ho et al. 2022 ("Video Diffusion Models", Sec. 3) factorise a 3-D U-Net into per-frame 2-D layers
and layers that mix frames only: here diffusers' ``TemporalConvLayer`` (ModelScope's four
``GroupNorm -> SiLU -> Conv3d(3x1x1)`` stages with a residual; the last conv starts at zero, so a new
layer is the identity) and ``TransformerTemporalModel`` (self-attention over the frames of each pixel).
Attribute names mirror diffusers, so ``UNet3DConditionModel`` checkpoints load by name. The attention
layers are :class:`~jaxdiff.models.layers.transformer.Attention` s, i.e. attention ``Site`` s: controls
and the attention backends reach them. They attend over a flat frame sequence, so their ``hw`` is
``None`` (a ``Where(resolution=...)`` filter never selects them; select them by path).

:class:`RelativePositionBias` is a jaxdiff option (off by default, so diffusers' layout and numbers are
unchanged): Ho et al. 2022 (Sec. 3) give each temporal attention relative position information "so that the
network can distinguish ordering of frames in a way that does not require an absolute notion of video time";
here as a learned per-head scalar bias of the clipped frame offset ``j - i`` added to the logits (Shaw et al.
2018; the scalar form of Raffel et al. 2020's T5 bias, without buckets).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.attention_control import ControlRun
from jaxdiff.models.layers import weight_tie
from jaxdiff.models.layers.make import Identity, Maker
from jaxdiff.models.layers.transformer import BasicTransformerBlock

Array = jax.Array


def frame_conv(mk: Maker, cin: int, cout: int, *, zero: bool = False) -> nnx.Conv:
    """``torch.nn.Conv3d(cin, cout, (3, 1, 1), padding=(1, 0, 0))`` on (B, F, H, W, C): a conv over frames only
    (zero-padded at the first and last frame), PyTorch-default initialisation unless ``zero``."""
    inits = mk._inits(3 * cin, zero)
    return nnx.Conv(cin, cout, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), dtype=mk.dtype,
                    param_dtype=mk.param_dtype, rngs=mk.keys,
                    conv_general_dilated=weight_tie.conv_general_dilated, **inits)


def _check_video(x: Array, where: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{where} takes video activations (B, F, H, W, C), got shape {x.shape}")


class TemporalConvLayer(nnx.Module):
    """``x + conv4(conv3(conv2(conv1(x))))``, each ``convN`` a ``GroupNorm -> SiLU -> (Dropout) -> Conv3d(3x1x1)``
    (diffusers ``TemporalConvLayer``, from ModelScope's ``unet_sd.py``). The GroupNorm statistics are taken
    over all frames of a video, as diffusers' 5-D GroupNorm does; ``conv4`` starts at zero (identity)."""

    def __init__(self, in_dim: int, mk: Maker, *, out_dim: int | None = None, norm_num_groups: int = 32):
        out_dim = out_dim or in_dim
        # Identity() fills the SiLU / Dropout slots of the torch Sequentials (no parameters).
        self.conv1 = nnx.List([mk.group_norm(in_dim, norm_num_groups, 1e-5), Identity(),
                               frame_conv(mk, in_dim, out_dim)])
        stages = []
        for i in range(3):
            stages.append(nnx.List([mk.group_norm(out_dim, norm_num_groups, 1e-5), Identity(), Identity(),
                                    frame_conv(mk, out_dim, in_dim, zero=i == 2)]))
        self.conv2, self.conv3, self.conv4 = stages

    def __call__(self, x: Array) -> Array:
        _check_video(x, "TemporalConvLayer")
        h = self.conv1[2](jax.nn.silu(self.conv1[0](x)))
        for stage in (self.conv2, self.conv3, self.conv4):
            h = stage[3](jax.nn.silu(stage[0](h)))
        return x + h


class RelativePositionBias(nnx.Module):
    """Logit bias ``b[h, clip(j - i, -M, M)]`` for query frame ``i`` and key frame ``j`` (Shaw et al. 2018; Ho et al.
    2022 Sec. 3), one learned scalar per head and relative offset, ``M = max_distance``.

    ``embedding`` is (heads, 2M + 1), column ``M + d`` the bias of offset ``d``; it starts at zero, so a new
    bias leaves the attention unchanged. Offsets beyond ``M`` share the end columns.
    """

    def __init__(self, heads: int, max_distance: int, mk: Maker):
        if max_distance < 1:
            raise ValueError(f"max_distance must be a positive number of frames, got {max_distance}")
        self.max_distance = max_distance
        self.embedding = nnx.Param(jnp.zeros((heads, 2 * max_distance + 1), mk.param_dtype))

    def __call__(self, frames: int) -> Array:
        """The (1, heads, frames, frames) bias for a clip of ``frames`` frames."""
        pos = jnp.arange(frames)
        offset = jnp.clip(pos[None, :] - pos[:, None], -self.max_distance, self.max_distance) + self.max_distance
        return self.embedding[...][:, offset][None]


class TransformerTemporalModel(nnx.Module):
    """Self-attention over frames: GroupNorm (over the whole video), ``proj_in`` (Linear), transformer blocks
    on the (B*H*W, F, inner) frame sequences of each pixel, ``proj_out``, plus the input.

    diffusers ``TransformerTemporalModel`` with ``double_self_attention=True`` (both attentions of each
    ``BasicTransformerBlock`` attend over frames; diffusers never passes the text to them) and no
    positional embedding. ``heads * dim_head`` need not equal ``in_channels``.

    ``relative_positions=M > 0`` (a jaxdiff option, not in diffusers) adds a :class:`RelativePositionBias`
    (``relative_position_bias``) to the logits of both frame attentions of every block (Ho et al. 2022 Sec. 3).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, mk: Maker, *, num_layers: int = 1,
                 norm_num_groups: int = 32, relative_positions: int = 0):
        inner = heads * dim_head
        self.norm = mk.group_norm(in_channels, norm_num_groups, 1e-6)
        self.proj_in = mk.linear(in_channels, inner)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(inner, heads, dim_head, mk)
                                            for _ in range(num_layers)])
        self.proj_out = mk.linear(inner, in_channels)
        self.relative_position_bias = (RelativePositionBias(heads, relative_positions, mk) if relative_positions
                                       else None)

    def __call__(self, x: Array, control: ControlRun | None = None) -> Array:
        _check_video(x, "TransformerTemporalModel")
        b, f, h, w, _ = x.shape
        hs = self.proj_in(self.norm(x))
        hs = hs.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, hs.shape[-1])
        bias = None if self.relative_position_bias is None else self.relative_position_bias(f)
        for block in self.transformer_blocks:
            hs = block(hs, None, control, None, bias)
        hs = self.proj_out(hs).reshape(b, h, w, f, -1).transpose(0, 3, 1, 2, 4)
        return hs + x


def per_frame(fn: Any, x: Array, frames: int) -> Array:
    """Apply a video layer ``fn`` ((B, F, H, W, C) -> same) to per-frame activations (B*F, H, W, C)."""
    bf = x.shape[0]
    if bf % frames:
        raise ValueError(f"{bf} frames in the batch are not a whole number of {frames}-frame videos")
    return fn(x.reshape(bf // frames, frames, *x.shape[1:])).reshape(x.shape)
