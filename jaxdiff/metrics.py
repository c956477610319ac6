"""Distances between sample sets, for judging samplers against exact targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sliced_wasserstein(a: Array, b: Array, key: Array, num_projections: int = 256) -> Array:
    """Sliced 2-Wasserstein distance between two equal-size sample sets (n, d) (Rabin et al. 2011).

    Projects both sets on random unit directions, sorts, and averages the squared 1-D transport cost.
    """
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have equal shapes, got {a.shape} and {b.shape}")
    dirs = jax.random.normal(key, (a.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    pa = jnp.sort(a @ dirs, axis=0)
    pb = jnp.sort(b @ dirs, axis=0)
    return jnp.sqrt(jnp.mean((pa - pb) ** 2))


def mmd_rbf(a: Array, b: Array, bandwidth: float | None = None) -> Array:
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012, eq. 3).

    The bandwidth defaults to the median pairwise distance of the pooled samples.
    """
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    pooled = jnp.concatenate([a, b])
    d2 = jnp.sum((pooled[:, None] - pooled[None]) ** 2, axis=-1)
    h2 = jnp.median(d2) if bandwidth is None else bandwidth**2
    k = jnp.exp(-d2 / h2)
    n, m = a.shape[0], b.shape[0]
    kaa = (k[:n, :n].sum() - jnp.trace(k[:n, :n])) / (n * (n - 1))
    kbb = (k[n:, n:].sum() - jnp.trace(k[n:, n:])) / (m * (m - 1))
    kab = k[:n, n:].mean()
    return kaa + kbb - 2 * kab
