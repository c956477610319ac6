"""Euler and DDIM / Euler-ancestral steps in sigma space."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn, ancestral_split, noise_like

Array = jax.Array


@pytree_dataclass
class Euler:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, eq. 3)."""

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        x0 = denoise(x, sigma)
        return x0 + (sigma_next / sigma) * (x - x0), state


@pytree_dataclass
class DDIM:
    """DDIM (Song et al. 2021, eq. 12) in sigma space; ``eta = 0`` is deterministic, ``eta = 1`` ancestral.

    ``x_next = x0 + sigma_down * eps_hat + sigma_up * z`` with ``eps_hat = (x - x0) / sigma`` and the
    split of :func:`ancestral_split`. Dividing DDIM's VP update by ``sqrt(abar_next)`` gives exactly
    this, and it is also k-diffusion's Euler-ancestral step, so :class:`EulerAncestral` shares it.
    With ``eta = 0`` it also runs noise levels upward (DDIM inversion).
    """

    eta: Array | float = 0.0

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        x0 = denoise(x, sigma)
        down, up = ancestral_split(sigma, sigma_next, self.eta)
        down = jnp.where(sigma_next > sigma, sigma_next, down)  # inversion: deterministic move upward
        return x0 + (down / sigma) * (x - x0) + up * noise_like(key, x), state


@pytree_dataclass
class EulerAncestral(DDIM):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``; diffusers ``EulerAncestralDiscreteScheduler``): DDIM with eta = 1 by default."""

    eta: Array | float = 1.0
