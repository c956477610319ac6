"""DPM-Solver++(2M) SDE: the stochastic multistep variant (midpoint form)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn, as_leaves, check_option, noise_like
from jaxdiff.samplers.dpmpp_2m import multistep_estimate

Array = jax.Array


@pytree_dataclass
class DPMSolverPP2MSDE:
    """DPM-Solver++(2M) for the reverse SDE (Lu et al. 2022, Sec. 5 / App. B), in sigma space.

    With ``h = log(sigma/sigma')``, ``g = -expm1(-(1 + eta) h)`` and ``D_hat`` as in
    :class:`DPMSolverPP2M`: ``x' = (sigma'/sigma) e^{-eta h} x + g D_hat + sigma' sqrt(-expm1(-2 eta h)) s_noise z``.
    ``eta = 1`` is diffusers' ``algorithm_type="sde-dpmsolver++"`` (midpoint) and k-diffusion's
    ``sample_dpmpp_2m_sde``; ``eta = 0`` is the ODE solver. The step to ``sigma' = 0`` returns ``D_i``.
    """

    eta: Array | float = 1.0
    s_noise: Array | float = 1.0

    def __post_init__(self) -> None:
        check_option("eta", self.eta, lambda v: v >= 0, "non-negative")
        check_option("s_noise", self.s_noise, lambda v: v >= 0, "non-negative")
        as_leaves(self, floats=("eta", "s_noise"))

    def init(self, x: Array) -> tuple[Array, Array]:
        return jnp.zeros_like(x), jnp.zeros((), x.dtype)

    def step(self, denoise: DenoiseFn, state: tuple[Array, Array], x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, tuple[Array, Array]]:
        prev_x0, prev_sigma = state
        x0 = denoise(x, sigma)
        h, d = multistep_estimate(x0, prev_x0, prev_sigma, sigma, sigma_next)
        eta_h = self.eta * h
        x_sde = ((sigma_next / sigma) * jnp.exp(-eta_h) * x - jnp.expm1(-h - eta_h) * d
                 + sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta_h)) * self.s_noise * noise_like(key, x))
        return jnp.where(sigma_next > 0, x_sde, x0), (x0, jnp.asarray(sigma, x.dtype))
