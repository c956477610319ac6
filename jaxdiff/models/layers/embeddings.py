"""The sinusoidal timestep embedding (one implementation for every model) and its MLP."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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
