"""Building blocks shared by jaxdiff's convolutional networks (U-Nets, VAE, ControlNet).

Every block mirrors the attribute names of its diffusers counterpart (``ResnetBlock2D.norm1``,
``Attention.to_out[0]``, ``Transformer2DModel.proj_in``...), so PyTorch checkpoints load by name
(see :mod:`jaxdiff.convert.torch_layout`). Tensors are NHWC (channels last) throughout.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.torch_layout import shapes_only
from jaxdiff.models.attention import attention

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation called ``name`` in diffusers' ``get_activation``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _host_or_traced(host: Callable[[np.random.Generator, tuple], np.ndarray],
                    traced: Callable[..., Array]) -> Callable[..., Array]:
    """An initializer drawing on the host (numpy) for concrete keys, in JAX for traced ones.

    Eager JAX random draws compile once per parameter shape (0.1-1 s each on CPU), which made
    building even a tiny U-Net take tens of seconds; under ``nnx.eval_shape`` or ``jit`` the key is
    traced and the JAX version keeps the build abstract / compiled. Inside
    :func:`jaxdiff.convert.torch_layout.abstract` the values are thrown away, so zeros are traced
    (one op instead of a random-number kernel per parameter: a smaller, faster trace).
    """

    def init(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
        if isinstance(key, jax.core.Tracer):
            return jnp.zeros(shape, dtype) if shapes_only() else traced(key, shape, dtype)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        return jnp.asarray(host(rng, tuple(shape)), dtype)

    return init


def torch_default_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default Linear/Conv2d initialisation: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    for weights and biases (kaiming-uniform with a = sqrt(5)), as a diffusers model starts from."""
    bound = 1.0 / math.sqrt(fan_in)
    return _host_or_traced(lambda rng, shape: rng.uniform(-bound, bound, shape),
                           lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))


class KeySource:
    """Per-layer initialisation keys ``fold_in(key, i)`` drawn with a Python counter.

    Passed to Flax layers in place of ``nnx.Rngs`` (they only call ``.params()``). ``nnx.Rngs``
    keeps its counter in a traced Variable, and under ``nnx.eval_shape`` every draw then costs a
    scan of the whole trace so far: building SD 1.5 abstractly took ~30 s instead of ~2 s.
    """

    def __init__(self, key: Array):
        self.key, self.count = key, 0

    def params(self) -> Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


@dataclass(frozen=True)
class Maker:
    """Construction context: random keys and dtypes, with PyTorch-default layer factories.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. Norms compute their
    statistics in float32 whatever ``dtype`` is (Flax does so), and use the two-pass variance
    as PyTorch does. One key is drawn from ``rngs``; layers get keys folded from it.
    """

    rngs: nnx.Rngs
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    keys: KeySource = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "keys", KeySource(self.rngs.params()))

    def conv(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding: Any = None,
             bias: bool = True, zero: bool = False) -> nnx.Conv:
        """``torch.nn.Conv2d``; ``padding`` defaults to ``kernel // 2`` on every side.

        ``zero=True`` starts weights and bias at zero (ControlNet's "zero convolutions").
        """
        if padding is None:
            padding = kernel // 2
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        init = nnx.initializers.zeros_init() if zero else torch_default_init(kernel * kernel * cin)
        return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, use_bias=bias,
                        kernel_init=init, bias_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                        rngs=self.keys)

    def linear(self, fin: int, fout: int, *, bias: bool = True) -> nnx.Linear:
        init = torch_default_init(fin)
        return nnx.Linear(fin, fout, use_bias=bias, kernel_init=init, bias_init=init, dtype=self.dtype,
                          param_dtype=self.param_dtype, rngs=self.keys)

    def group_norm(self, channels: int, groups: int, eps: float) -> nnx.GroupNorm:
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups; "
                             "fix block_out_channels or norm_num_groups in the config")
        return GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                         dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys)

    def layer_norm(self, features: int, eps: float) -> nnx.LayerNorm:
        return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, rngs=self.keys)

    def embed(self, num: int, features: int) -> nnx.Embed:
        return nnx.Embed(num, features, embedding_init=_host_or_traced(lambda rng, shape: rng.standard_normal(shape),
                                                                       jax.random.normal),
                         dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys)


class GroupNorm(nnx.GroupNorm):
    """``torch.nn.GroupNorm`` on channels-last input (B, ..., C), same parameters as ``nnx.GroupNorm``.

    Statistics are two-pass (mean, then mean squared deviation) in float32, reduced first per
    channel over the contiguous spatial rows and then per group; normalisation and the affine map
    fold into one per-channel scale and shift. XLA:CPU runs this 4-10x faster than Flax's
    reduction over the (spatial, group-member) axes of a grouped reshape.
    """

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        if mask is not None or self.reduction_axes is not None or x.ndim < 3:
            return super().__call__(x, mask=mask)
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        xf = x.reshape(b, -1, c).astype(jnp.float32)
        n = xf.shape[1] * (c // g)
        per_group = lambda v: jnp.repeat(v.reshape(b, g, c // g).sum(-1) / n, c // g, axis=1)  # noqa: E731
        mean = per_group(xf.sum(axis=1))
        var = per_group(jnp.square(xf - mean[:, None, :]).sum(axis=1))
        scale = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            scale = scale * self.scale[...].astype(jnp.float32)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias[...].astype(jnp.float32)
        y = xf * scale[:, None, :] + shift[:, None, :]
        return y.reshape(x.shape).astype(self.dtype or x.dtype)


class Identity(nnx.Module):
    """Parameter-free placeholder (``nn.Identity``, ``nn.Dropout`` slots of torch Sequentials)."""

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Array:
        return x


# --- time embedding -------------------------------------------------------------------------------


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of (fractional) timesteps, (B,) -> (B, dim), float32.

    Transformer positional encoding as used by DDPM (Ho et al. 2020); compatible with diffusers'
    ``get_timestep_embedding``: frequencies ``exp(-log(max_period) * i / (half - shift))``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = scale * jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def batch_timesteps(timesteps: Any, batch: int) -> Array:
    """A scalar or (B,) timestep array broadcast to (batch,) float32."""
    t = jnp.asarray(timesteps, jnp.float32)
    if t.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or a (batch,) array, got shape {t.shape}")
    return jnp.broadcast_to(t.reshape(-1), (batch,))


class TimestepEmbedding(nnx.Module):
    """``linear_2(act(linear_1(t_emb)))``: diffusers ``TimestepEmbedding`` (no cond_proj)."""

    def __init__(self, in_channels: int, time_embed_dim: int, mk: Maker, act_fn: str = "silu"):
        self.linear_1 = mk.linear(in_channels, time_embed_dim)
        self.linear_2 = mk.linear(time_embed_dim, time_embed_dim)
        self.act = activation(act_fn)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(self.act(self.linear_1(x)))


# --- resampling -----------------------------------------------------------------------------------


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


# --- residual block -------------------------------------------------------------------------------


class ResnetBlock2D(nnx.Module):
    """Pre-activation residual block with time conditioning (diffusers ``ResnetBlock2D``).

    ``h = conv1(act(norm1(x))) + proj(act(temb))``; ``h = conv2(act(norm2(h)))``;
    ``out = (shortcut(x) + h) / output_scale_factor``. ``time_embedding_norm="scale_shift"``
    is the adaptive group norm of Dhariwal & Nichol (2021): ``norm2(h) * (1 + s) + b``.
    ``temb_channels=None`` builds a block without time input (VAE).
    """

    def __init__(self, in_channels: int, out_channels: int | None, mk: Maker, *, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6, act_fn: str = "silu",
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 use_in_shortcut: bool | None = None, conv_shortcut_bias: bool = True, down: bool = False,
                 up: bool = False):
        out_channels = out_channels or in_channels
        if time_embedding_norm not in ("default", "scale_shift", "group"):
            raise ValueError(f"unsupported time_embedding_norm / resnet_time_scale_shift {time_embedding_norm!r}; "
                             "use 'default' or 'scale_shift'")
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.act = activation(act_fn)
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
            t = self.time_emb_proj(self.act(temb))[:, None, None, :]
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


# --- attention ------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Multi-head (self or cross) attention, diffusers ``Attention`` with the default processor.

    ``softmax(q k^T / sqrt(dim_head)) v`` per head (Vaswani et al. 2017); on CPU (the ``"cpu"`` and
    ``"blockwise"`` backends) logits and softmax are computed in float32, so ``upcast_attention`` /
    ``upcast_softmax`` hold for any dtype.
    On 4-D NHWC input (the VAE / pixel U-Net attention) it flattens the pixels, applies the
    optional ``group_norm`` first and, with ``residual_connection``, adds the input back and
    divides by ``rescale_output_factor``. The kernel is :func:`jaxdiff.models.attention.attention`;
    ``attention_backend`` fixes its backend for this layer (``None``: the module default).
    """

    def __init__(self, query_dim: int, mk: Maker, *, heads: int = 8, dim_head: int = 64,
                 cross_attention_dim: int | None = None, bias: bool = False, out_bias: bool = True,
                 norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, attention_backend: str | None = None):
        inner = heads * dim_head
        self.heads = heads
        self.attention_backend = attention_backend
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = mk.group_norm(query_dim, norm_num_groups, eps) if norm_num_groups else None
        kv_dim = cross_attention_dim or query_dim
        self.to_q = mk.linear(query_dim, inner, bias=bias)
        self.to_k = mk.linear(kv_dim, inner, bias=bias)
        self.to_v = mk.linear(kv_dim, inner, bias=bias)
        self.to_out = nnx.List([mk.linear(inner, query_dim, bias=out_bias), Identity()])

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        residual = x
        spatial = x.ndim == 4
        if spatial:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, t.shape[-1] // self.heads)  # noqa: E731
        out = attention(split(q), split(k), split(v), backend=self.attention_backend)
        out = self.to_out[0](out.reshape(*out.shape[:2], -1))
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


class GEGLU(nnx.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020), diffusers ``GEGLU``."""

    def __init__(self, dim_in: int, dim_out: int, mk: Maker, *, bias: bool = True):
        self.proj = mk.linear(dim_in, 2 * dim_out, bias=bias)

    def __call__(self, x: Array) -> Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class GELUProj(nnx.Module):
    """``gelu(proj(x))`` (diffusers ``GELU`` with ``approximate`` none or tanh)."""

    def __init__(self, dim_in: int, dim_out: int, mk: Maker, *, approximate: bool = False, bias: bool = True):
        self.proj = mk.linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def __call__(self, x: Array) -> Array:
        return jax.nn.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nnx.Module):
    """``net[2](net[0](x))``: diffusers ``FeedForward`` (index 1 is the dropout slot)."""

    def __init__(self, dim: int, mk: Maker, *, mult: int = 4, activation_fn: str = "geglu",
                 inner_dim: int | None = None, bias: bool = True):
        inner = inner_dim or dim * mult
        if activation_fn == "geglu":
            first = GEGLU(dim, inner, mk, bias=bias)
        elif activation_fn in ("gelu", "gelu-approximate"):
            first = GELUProj(dim, inner, mk, approximate=activation_fn == "gelu-approximate", bias=bias)
        else:
            raise ValueError(f"unsupported feed-forward activation_fn {activation_fn!r}; "
                             "use 'geglu', 'gelu' or 'gelu-approximate'")
        self.net = nnx.List([first, Identity(), mk.linear(inner, dim, bias=bias)])

    def __call__(self, x: Array) -> Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual.

    diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"`` (Stable Diffusion).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mk: Maker, *, cross_attention_dim: int | None = None,
                 activation_fn: str = "geglu", attention_bias: bool = False, norm_eps: float = 1e-5,
                 only_cross_attention: bool = False):
        self.only_cross_attention = only_cross_attention
        self.norm1 = mk.layer_norm(dim, norm_eps)
        self.attn1 = Attention(dim, mk, heads=heads, dim_head=dim_head, bias=attention_bias,
                               cross_attention_dim=cross_attention_dim if only_cross_attention else None)
        self.norm2 = mk.layer_norm(dim, norm_eps)
        self.attn2 = Attention(dim, mk, heads=heads, dim_head=dim_head, bias=attention_bias,
                               cross_attention_dim=cross_attention_dim)
        self.norm3 = mk.layer_norm(dim, norm_eps)
        self.ff = FeedForward(dim, mk, activation_fn=activation_fn)

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer of latent diffusion (Rombach et al. 2022), diffusers ``Transformer2DModel``.

    GroupNorm, ``proj_in`` (1x1 conv, or a Linear when ``use_linear_projection`` as in SD 2),
    ``transformer_blocks`` over the flattened pixels, ``proj_out``, plus the input. The blocks run
    at width ``heads * dim_head``, which need not equal ``in_channels`` (diffusers allows it).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, mk: Maker, *, num_layers: int = 1,
                 cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = mk.group_norm(in_channels, norm_num_groups, 1e-6)
        if use_linear_projection:
            self.proj_in = mk.linear(in_channels, inner)
            self.proj_out = mk.linear(inner, in_channels)
        else:
            self.proj_in = mk.conv(in_channels, inner, 1)
            self.proj_out = mk.conv(inner, in_channels, 1)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, mk, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention)
            for _ in range(num_layers)
        ])

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        b, h, w, _ = x.shape
        hs = self.proj_in(self.norm(x))  # a 1x1 conv and a Linear both act on the last axis
        hs = hs.reshape(b, h * w, hs.shape[-1])
        for block in self.transformer_blocks:
            hs = block(hs, context)
        hs = self.proj_out(hs.reshape(b, h, w, hs.shape[-1]))
        return hs + x


# --- U-Net stages ---------------------------------------------------------------------------------


def _call_attention(attn: nnx.Module, x: Array, context: Array | None) -> Array:
    """Transformer2DModel takes the text context; a plain spatial Attention attends to itself."""
    return attn(x, context) if isinstance(attn, Transformer2DModel) else attn(x)


def _call_resampler(sampler: nnx.Module, x: Array, temb: Array | None, **kwargs: Any) -> Array:
    return sampler(x, temb) if isinstance(sampler, ResnetBlock2D) else sampler(x, **kwargs)


class DownBlock(nnx.Module):
    """An encoder stage: per layer ``resnets[i]`` then ``attentions[i]``, then ``downsamplers[0]``.

    One class for diffusers' ``DownBlock2D``, ``CrossAttnDownBlock2D``, ``AttnDownBlock2D`` and
    ``DownEncoderBlock2D`` (they differ only in which attention, if any, follows each resnet).
    Returns the output and the skip connections (every layer's output, then the downsampled one).
    """

    def __init__(self, resnets: list[nnx.Module], attentions: list[nnx.Module] | None = None,
                 downsamplers: list[nnx.Module] | None = None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None
        self.downsamplers = nnx.List(downsamplers) if downsamplers else None

    def __call__(self, x: Array, temb: Array | None = None,
                 context: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _call_attention(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = _call_resampler(self.downsamplers[0], x, temb)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nnx.Module):
    """A decoder stage: per layer concatenate a skip (if any), ``resnets[i]``, ``attentions[i]``;
    then ``upsamplers[0]``.

    One class for diffusers' ``UpBlock2D``, ``CrossAttnUpBlock2D``, ``AttnUpBlock2D`` and
    ``UpDecoderBlock2D`` (no skips). Skips are consumed from the end of the tuple.
    """

    def __init__(self, resnets: list[nnx.Module], attentions: list[nnx.Module] | None = None,
                 upsamplers: list[nnx.Module] | None = None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None
        self.upsamplers = nnx.List(upsamplers) if upsamplers else None

    def __call__(self, x: Array, skips: tuple[Array, ...] = (), temb: Array | None = None,
                 context: Array | None = None, upsample_size: tuple[int, int] | None = None) -> Array:
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            if skips:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _call_attention(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = _call_resampler(self.upsamplers[0], x, temb, output_size=upsample_size)
        return x


class MidBlock(nnx.Module):
    """``resnets[0]``, then alternately ``attentions[i]`` and ``resnets[i + 1]``.

    diffusers ``UNetMidBlock2D`` (spatial self-attention; none when ``add_attention`` is off) and
    ``UNetMidBlock2DCrossAttn`` (a Transformer2DModel).
    """

    def __init__(self, resnets: list[nnx.Module], attentions: list[nnx.Module] | None = None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None

    def __call__(self, x: Array, temb: Array | None = None, context: Array | None = None) -> Array:
        x = self.resnets[0](x, temb)
        for i in range(1, len(self.resnets)):
            if self.attentions is not None:
                x = _call_attention(self.attentions[i - 1], x, context)
            x = self.resnets[i](x, temb)
        return x


def spatial_attention(channels: int, mk: Maker, *, head_dim: int, groups: int | None, eps: float,
                      rescale_output_factor: float = 1.0) -> Attention:
    """The self-attention of diffusers' pixel / VAE blocks (``_from_deprecated_attn_block``).

    As in diffusers' ``AttnDownBlock2D`` / ``UNetMidBlock2D``, ``heads = channels // head_dim``
    heads of ``head_dim`` each: when ``head_dim`` does not divide ``channels`` the queries, keys
    and values are ``heads * head_dim`` wide (narrower than ``channels``) and ``to_out`` maps
    back to ``channels``.
    """
    if not 0 < head_dim <= channels:
        raise ValueError(f"attention_head_dim {head_dim} must be between 1 and the block's {channels} channels")
    return Attention(channels, mk, heads=channels // head_dim, dim_head=head_dim, bias=True,
                     norm_num_groups=groups, eps=eps, residual_connection=True,
                     rescale_output_factor=rescale_output_factor)


# --- configs --------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build the frozen dataclass ``cls`` from a reference ``config.json`` dict.

    Unknown keys and keys starting with ``_`` are ignored; lists become tuples.
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _freeze(v) for k, v in d.items() if k in names and not k.startswith("_")}
    return cls(**kwargs)


def per_block(value: Any, n: int, name: str) -> tuple:
    """An int/str/None broadcast to ``n`` blocks, or a length-``n`` sequence checked."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but the model has {n} blocks")
        return tuple(value)
    return (value,) * n
