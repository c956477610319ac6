"""DPM-Solver++(2M): second-order multistep exponential integrator with data prediction."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn

Array = jax.Array


def log_step(sigma: Array, sigma_next: Array) -> Array:
    """``h = lambda_next - lambda`` with ``lambda = -log sigma`` (the log-SNR / 2 in VE coordinates); finite for sigma_next = 0 (unused there)."""
    return jnp.log(sigma) - jnp.log(jnp.where(sigma_next > 0, sigma_next, sigma))


def multistep_estimate(x0: Array, prev_x0: Array, prev_sigma: Array, sigma: Array,
                       sigma_next: Array) -> tuple[Array, Array]:
    """The 2M data estimate ``D_hat = D_i + (D_i - D_{i-1}) / (2 r)`` with ``r = h_{i-1} / h_i`` (Lu et al. 2022, Alg. 2).

    Returns ``(h_i, D_hat)``; ``D_hat = D_i`` (first order) without a previous output or on the step to 0.
    """
    second = (prev_sigma > 0) & (sigma_next > 0)
    h = log_step(sigma, sigma_next)
    r = jnp.where(second, log_step(jnp.where(second, prev_sigma, 1.0), sigma) / h, 1.0)
    return h, jnp.where(second, x0 + (x0 - prev_x0) / (2.0 * r), x0)


@pytree_dataclass
class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), in sigma space.

    ``x' = (sigma'/sigma) x - expm1(-h) D_hat`` with ``h = log(sigma/sigma')`` and
    ``D_hat = D_i + (D_i - D_{i-1}) / (2 r)``, ``r = h_{i-1} / h`` (the midpoint form of diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` and k-diffusion's
    ``sample_dpmpp_2m``). First order (``D_hat = D_i``, i.e. DDIM) on the first step and on the step
    to ``sigma' = 0``, which returns ``D_i``. State: the previous denoised sample and its sigma (0: none).
    """

    def init(self, x: Array) -> tuple[Array, Array]:
        return jnp.zeros_like(x), jnp.zeros((), x.dtype)

    def step(self, denoise: DenoiseFn, state: tuple[Array, Array], x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, tuple[Array, Array]]:
        prev_x0, prev_sigma = state
        x0 = denoise(x, sigma)
        h, d = multistep_estimate(x0, prev_x0, prev_sigma, sigma, sigma_next)
        x_next = jnp.where(sigma_next > 0, (sigma_next / sigma) * x - jnp.expm1(-h) * d, x0)
        return x_next, (x0, jnp.asarray(sigma, x.dtype))
