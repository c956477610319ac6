"""The time-conditioned residual block and the 2x down / up resamplers (diffusers ``resnet.py``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.layers.make import Maker, activation

Array = jax.Array


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution (diffusers ``Downsample2D`` with ``use_conv=True``).

    ``padding=0`` reproduces the VAE encoder's asymmetric zero pad (right and bottom only);
    ``use_conv=False`` is a 2x2 average pool.
    """

    def __init__(self, channels: int, mk: Maker, *, use_conv: bool = True, out_channels: int | None = None,
                 padding: int = 1):
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            pad = ((0, 1), (0, 1)) if padding == 0 else padding
            self.conv = mk.conv(channels, out_channels, 3, stride=2, padding=pad)
        elif out_channels != channels:
            raise ValueError("Downsample2D without a convolution cannot change the channel count")

    def __call__(self, x: Array) -> Array:
        if self.use_conv:
            return self.conv(x)
        b, h, w, c = x.shape
        return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest(x: Array, size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour upsampling, x2 or to ``size`` (PyTorch ``F.interpolate(mode="nearest")``)."""
    h, w = x.shape[1:3]
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32)
    cols = np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32)
    return x[:, np.minimum(rows, h - 1)][:, :, np.minimum(cols, w - 1)]


class Upsample2D(nnx.Module):
    """Nearest x2 upsampling then a 3x3 convolution (diffusers ``Upsample2D``, ``use_conv=True``)."""

    def __init__(self, channels: int, mk: Maker, *, use_conv: bool = True, out_channels: int | None = None):
        self.use_conv = use_conv
        if use_conv:
            self.conv = mk.conv(channels, out_channels or channels, 3)

    def __call__(self, x: Array, output_size: tuple[int, int] | None = None) -> Array:
        x = upsample_nearest(x, output_size)
        return self.conv(x) if self.use_conv else x


class ResnetBlock2D(nnx.Module):
    """Pre-activation residual block with time conditioning (diffusers ``ResnetBlock2D``).

    ``h = conv1(act(norm1(x))) + proj(act(temb))``; ``h = conv2(act(norm2(h)))``;
    ``out = (shortcut(x) + h) / output_scale_factor``. ``time_embedding_norm="scale_shift"``
    is the adaptive group norm of Dhariwal & Nichol (2021): ``norm2(h) * (1 + s) + b``.
    ``temb_channels=None`` builds a block without time input (VAE); ``skip_time_act`` feeds ``temb`` to
    ``time_emb_proj`` without the activation. ``down`` / ``up`` resample (2x2 mean / nearest x2) after
    ``norm1`` (BigGAN-style up/down residual blocks, diffusers ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``).
    """

    def __init__(self, in_channels: int, out_channels: int | None, mk: Maker, *, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6, act_fn: str = "silu",
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 use_in_shortcut: bool | None = None, conv_shortcut_bias: bool = True, down: bool = False,
                 up: bool = False, skip_time_act: bool = False):
        out_channels = out_channels or in_channels
        if time_embedding_norm not in ("default", "scale_shift", "group"):
            raise ValueError(f"unsupported time_embedding_norm / resnet_time_scale_shift {time_embedding_norm!r}; "
                             "use 'default' or 'scale_shift'")
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.act = activation(act_fn)
        self.skip_time_act = skip_time_act
        self.down, self.up = down, up
        self.norm1 = mk.group_norm(in_channels, groups, eps)
        self.conv1 = mk.conv(in_channels, out_channels, 3)
        mult = 2 if time_embedding_norm == "scale_shift" else 1
        has_temb = temb_channels is not None and time_embedding_norm != "group"
        self.time_emb_proj = mk.linear(temb_channels, mult * out_channels) if has_temb else None
        self.norm2 = mk.group_norm(out_channels, groups_out or groups, eps)
        self.conv2 = mk.conv(out_channels, out_channels, 3)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (mk.conv(in_channels, out_channels, 1, bias=conv_shortcut_bias)
                              if use_in_shortcut else None)

    def _resample(self, x: Array) -> Array:
        if self.up:
            return upsample_nearest(x)
        if self.down:
            b, h, w, c = x.shape
            return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return x

    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        h = self.act(self.norm1(x))
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        else:
            if self.time_embedding_norm == "scale_shift":
                raise ValueError("a scale_shift ResnetBlock2D needs a time embedding (temb)")
            h = self.norm2(h)
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor
