"""Heun's second-order sampler with stochastic churn (EDM)."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, replace
from jaxdiff.samplers._base import DenoiseFn, as_leaves, check_option, noise_like

Array = jax.Array


@pytree_dataclass
class Heun:
    """Karras et al. 2022, Algorithm 2 (deterministic Algorithm 1 when ``s_churn = 0``).

    ``gamma = min(s_churn / N, sqrt(2) - 1)`` for ``s_tmin <= sigma <= s_tmax`` (else 0), where N is the
    number of steps; ``sigma_hat = (1 + gamma) sigma``; ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) s_noise z``;
    an Euler step from ``sigma_hat`` to ``sigma_next`` corrected by the trapezoidal rule, except on the
    step to ``sigma_next = 0`` where the second evaluation is skipped (``lax.cond``: one NFE there).
    N comes from the schedule through :meth:`prepare`, which the runner calls. Without churn this is
    diffusers' ``HeunDiscreteScheduler`` and k-diffusion's ``sample_heun``.
    """

    s_churn: Array | float = 0.0
    s_tmin: Array | float = 0.0
    s_tmax: Array | float = float("inf")
    s_noise: Array | float = 1.0
    num_steps: Array | int | None = None

    def __post_init__(self) -> None:
        check_option("s_churn", self.s_churn, lambda v: v >= 0, "non-negative")
        check_option("s_noise", self.s_noise, lambda v: v >= 0, "non-negative")
        as_leaves(self, floats=("s_churn", "s_tmin", "s_tmax", "s_noise"), ints=("num_steps",))

    def prepare(self, sigmas: Any) -> "Heun":
        return replace(self, num_steps=sigmas.count)

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        if self.num_steps is None:
            raise ValueError("Heun needs the number of steps for its churn; call sampler.prepare(sigmas) "
                             "first (jaxdiff.sampling.sample does this for you)")
        in_range = (sigma >= self.s_tmin) & (sigma <= self.s_tmax)
        gamma = jnp.where(in_range, jnp.minimum(self.s_churn / self.num_steps, math.sqrt(2.0) - 1.0), 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        # sqrt(sigma_hat^2 - sigma^2), written so that gamma = 0 gives exactly 0 (no fused-multiply residue)
        x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * self.s_noise * noise_like(key, x)
        d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
        x_euler = x_hat + (sigma_next - sigma_hat) * d

        def trapezoid() -> Array:
            d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
            return x_hat + (sigma_next - sigma_hat) * (0.5 * (d + d_next))

        return jax.lax.cond(sigma_next > 0, trapezoid, lambda: x_euler), state
