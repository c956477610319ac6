"""U-Net stages: one ``DownBlock``, ``UpBlock`` and ``MidBlock`` for every diffusers variant."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.layers.added_kv import AddedKVAttention
from jaxdiff.models.layers.resnet import ResnetBlock2D
from jaxdiff.models.layers.transformer import Transformer2DModel

Array = jax.Array


def _call_attention(attn: nnx.Module, x: Array, context: Array | None, control: Any = None,
                    text_bias: Array | None = None) -> Array:
    """Transformer2DModel takes the text context; AddedKVAttention the text and its mask bias; a plain spatial
    Attention attends to itself."""
    if isinstance(attn, AddedKVAttention):
        return attn(x, context, control, text_bias)
    return attn(x, context, control) if isinstance(attn, Transformer2DModel) else attn(x, control=control)


def _call_resampler(sampler: nnx.Module, x: Array, temb: Array | None, **kwargs: Any) -> Array:
    return sampler(x, temb) if isinstance(sampler, ResnetBlock2D) else sampler(x, **kwargs)


class DownBlock(nnx.Module):
    """An encoder stage: per layer ``resnets[i]`` then ``attentions[i]``, then ``downsamplers[0]``.

    One class for diffusers' ``DownBlock2D``, ``CrossAttnDownBlock2D``, ``AttnDownBlock2D``,
    ``DownEncoderBlock2D``, ``ResnetDownsampleBlock2D`` and ``SimpleCrossAttnDownBlock2D`` (they differ only
    in which attention, if any, follows each resnet, and in the downsampler: a strided convolution or a
    ``ResnetBlock2D(down=True)``). ``text_bias`` is the text mask's logit bias for added-KV attention.
    Returns the output and the skip connections (every layer's output, then the downsampled one).
    ``residual`` (T2I-Adapter features) is added to the last layer's output, so that skip and the
    downsampler carry it (diffusers' ``CrossAttnDownBlock2D(additional_residuals=...)``).
    """

    def __init__(self, resnets: list[nnx.Module], attentions: list[nnx.Module] | None = None,
                 downsamplers: list[nnx.Module] | None = None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None
        self.downsamplers = nnx.List(downsamplers) if downsamplers else None

    def __call__(self, x: Array, temb: Array | None = None, context: Array | None = None,
                 control: Any = None, residual: Array | None = None,
                 text_bias: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _call_attention(self.attentions[i], x, context, control, text_bias)
            if residual is not None and i == len(self.resnets) - 1:
                x = x + residual.astype(x.dtype)
            skips.append(x)
        if self.downsamplers is not None:
            x = _call_resampler(self.downsamplers[0], x, temb)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nnx.Module):
    """A decoder stage: per layer concatenate a skip (if any), ``resnets[i]``, ``attentions[i]``;
    then ``upsamplers[0]``.

    One class for diffusers' ``UpBlock2D``, ``CrossAttnUpBlock2D``, ``AttnUpBlock2D``, ``UpDecoderBlock2D``
    (no skips), ``ResnetUpsampleBlock2D`` and ``SimpleCrossAttnUpBlock2D``. Skips are consumed from the end
    of the tuple.
    """

    def __init__(self, resnets: list[nnx.Module], attentions: list[nnx.Module] | None = None,
                 upsamplers: list[nnx.Module] | None = None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None
        self.upsamplers = nnx.List(upsamplers) if upsamplers else None

    def __call__(self, x: Array, skips: tuple[Array, ...] = (), temb: Array | None = None,
                 context: Array | None = None, upsample_size: tuple[int, int] | None = None,
                 control: Any = None, text_bias: Array | None = None) -> Array:
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            if skips:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _call_attention(self.attentions[i], x, context, control, text_bias)
        if self.upsamplers is not None:
            x = _call_resampler(self.upsamplers[0], x, temb, output_size=upsample_size)
        return x


class MidBlock(nnx.Module):
    """``resnets[0]``, then alternately ``attentions[i]`` and ``resnets[i + 1]``.

    diffusers ``UNetMidBlock2D`` (spatial self-attention; none when ``add_attention`` is off) and
    ``UNetMidBlock2DCrossAttn`` (a Transformer2DModel) and ``UNetMidBlock2DSimpleCrossAttn`` (added-KV
    attention).
    """

    def __init__(self, resnets: list[nnx.Module], attentions: list[nnx.Module] | None = None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None

    def __call__(self, x: Array, temb: Array | None = None, context: Array | None = None,
                 control: Any = None, text_bias: Array | None = None) -> Array:
        x = self.resnets[0](x, temb)
        for i in range(1, len(self.resnets)):
            if self.attentions is not None:
                x = _call_attention(self.attentions[i - 1], x, context, control, text_bias)
            x = self.resnets[i](x, temb)
        return x
