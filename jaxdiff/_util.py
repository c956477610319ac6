"""Small array helpers shared by the core (no Flax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def batch_sigma(sigma: Array, x: Array) -> Array:
    """Noise level(s) as a vector of length ``x.shape[0]`` (a scalar is broadcast)."""
    sigma = jnp.asarray(sigma, dtype=x.dtype)
    if sigma.ndim > 1:
        raise ValueError(f"sigma must be a scalar or a vector of per-sample levels, got shape {sigma.shape}")
    return jnp.broadcast_to(sigma, (x.shape[0],))


def expand_to(v: Array, x: Array) -> Array:
    """Reshape a per-sample vector (B,) (or scalar) to broadcast against ``x`` (B, ...)."""
    v = jnp.asarray(v, dtype=x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))
