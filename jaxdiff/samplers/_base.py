"""The sampler contract shared by every solver in :mod:`jaxdiff.samplers`.

A sampler is a frozen pytree dataclass with two pure methods (DESIGN.md, "Schedules and samplers"):

- ``init(x) -> state``: the multistep memory before the first step (a fixed-structure pytree);
- ``step(denoise, state, x, sigma, sigma_next, key) -> (x_next, state)``: one move from noise level
  ``sigma`` to ``sigma_next``. ``denoise(x, sigma)`` is the denoiser with its conditioning bound.

Numeric hyper-parameters (eta, churn, SNR...) are pytree leaves, so changing them never recompiles.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


class Sampler(Protocol):
    def init(self, x: Array) -> Any: ...

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]: ...


def ancestral_split(sigma: Array, sigma_next: Array, eta: Array | float = 1.0) -> tuple[Array, Array]:
    """Split a move sigma -> sigma_next into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)`` (capped at sigma_next) and
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``: the DDPM posterior variance in VE coordinates.
    """
    up = jnp.minimum(sigma_next, eta * jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2), 0.0)) / sigma)
    down = jnp.sqrt(jnp.maximum(sigma_next**2 - up**2, 0.0))
    return down, up


def noise_like(key: Array, x: Array) -> Array:
    """Standard normal noise with the shape and dtype of x."""
    return jax.random.normal(key, x.shape, x.dtype)
