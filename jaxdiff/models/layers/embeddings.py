"""The sinusoidal timestep embedding (one implementation for every model) and its MLP."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.attention import attention
from jaxdiff.models.layers.make import Maker, activation

Array = jax.Array


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


class AttentionPooling(nnx.Module):
    """Multi-head attention of one query, the mean token plus ``positional_embedding``, over that query and
    the tokens; returns the pooled (B, D) vector (DeepFloyd IF's text pooling, diffusers ``AttentionPooling``)."""

    def __init__(self, num_heads: int, embed_dim: int, mk: Maker):
        if embed_dim % num_heads:
            raise ValueError(f"addition_embed_type_num_heads={num_heads} must divide the text width {embed_dim}")
        self.num_heads = num_heads
        key = mk.keys.params()  # N(0, 1 / embed_dim), as diffusers starts it
        self.positional_embedding = nnx.Param(
            (jax.random.normal(key, (1, embed_dim)) / math.sqrt(embed_dim)).astype(mk.param_dtype))
        self.k_proj = mk.linear(embed_dim, embed_dim)
        self.q_proj = mk.linear(embed_dim, embed_dim)
        self.v_proj = mk.linear(embed_dim, embed_dim)

    def __call__(self, x: Array) -> Array:
        b, _, d = x.shape
        cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
        tokens = jnp.concatenate([cls, x], axis=1)
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, d // self.num_heads)  # noqa: E731
        out = attention(heads(self.q_proj(cls)), heads(self.k_proj(tokens)), heads(self.v_proj(tokens)))
        return out.reshape(b, d)


class TextTimeEmbedding(nnx.Module):
    """``norm2(proj(pool(norm1(text))))``: the pooled text added to the time embedding (diffusers
    ``TextTimeEmbedding``, ``addition_embed_type="text"``; GLIDE / DeepFloyd IF)."""

    def __init__(self, encoder_dim: int, time_embed_dim: int, mk: Maker, num_heads: int = 64):
        self.norm1 = mk.layer_norm(encoder_dim, 1e-5)
        self.pool = AttentionPooling(num_heads, encoder_dim, mk)
        self.proj = mk.linear(encoder_dim, time_embed_dim)
        self.norm2 = mk.layer_norm(time_embed_dim, 1e-5)

    def __call__(self, text: Array) -> Array:
        return self.norm2(self.proj(self.pool(self.norm1(text))))
