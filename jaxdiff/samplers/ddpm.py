"""DDPM ancestral sampling (Ho et al. 2020) in sigma space."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.denoisers import split_variance
from jaxdiff.samplers._base import DenoiseFn, noise_like, threshold_x0

Array = jax.Array
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


@pytree_dataclass
class DDPM:
    """Ancestral sampling from the DDPM posterior ``q(x_prev | x_t, x0)`` (Ho et al. 2020, eqs. 6-7, Alg. 2).

    For a move between any two levels ``s > s'`` (skipping timesteps, as diffusers' ``DDPMScheduler``
    does: ``alpha_t = abar_t / abar_prev``, ``beta_t = 1 - alpha_t``, with ``abar = 1 / (1 + sigma^2)``),
    the posterior divided by ``sqrt(abar_prev)`` (VE coordinates) has mean ``x0 + (s'/s)^2 (x - x0)`` and
    variance ``s'^2 (s^2 - s'^2) / s^2`` (``"fixed_small"``: beta tilde, eq. 7) or
    ``(s^2 - s'^2) (1 + s'^2) / (1 + s^2)`` (``"fixed_large"``: beta). No noise is added on the last step
    (``s' = 0``), as in Alg. 2 (``z = 0`` at t = 1); diffusers adds ``sqrt(beta_t) z`` there with
    ``fixed_large`` whenever the final timestep is positive.

    ``"learned_range"`` reads the variance the network predicts (Nichol & Dhariwal 2021, eq. 15): the denoiser
    returns the data estimate with the interpolation ``v`` appended (``2C`` channels, see
    :class:`jaxdiff.denoisers.DiscreteVPDenoiser` ``learned_variance``), and the VP variance is
    ``exp((v+1)/2 log beta + (1-v)/2 log max(beta_tilde, 1e-20))`` with ``beta = (s^2 - s'^2) / (1 + s^2)`` and
    ``beta_tilde = s'^2 (s^2 - s'^2) / (s^2 (1 + s'^2))`` of the move (diffusers' ``DDPMScheduler`` and
    ``UnCLIPScheduler`` ``variance_type="learned_range"``), times ``1 + s'^2`` in VE coordinates.

    ``threshold`` (a denoiser transform such as ``guidance.static_threshold(-1, 1)``, or None) clips
    the x0 estimate before the posterior mean, as diffusers' ``DDPMScheduler`` does with
    ``clip_sample`` / ``thresholding``. The mean is linear in ``x0`` and ``x`` with fixed
    coefficients, so this equals wrapping the denoiser with the same transform; the field exists
    so that :func:`jaxdiff.pipelines.schedulers.plan` treats DDPM and DDIM folders alike.
    """

    variance: str = static_field(default="fixed_small")
    threshold: Any = None

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown DDPM variance {self.variance!r}; valid: {', '.join(VARIANCES)}")

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        x0, v = split_variance(denoise(x, sigma), x)
        if (v is None) == (self.variance == "learned_range"):
            got = x0.shape[-1] + (0 if v is None else v.shape[-1])
            raise ValueError(f"DDPM(variance={self.variance!r}) got a denoiser output with {got} channels for "
                             f"{x.shape[-1]}-channel samples: learned_range needs a learned-variance "
                             "denoiser (DiscreteVPDenoiser(learned_variance=True)), the others a plain one "
                             "(wrap it in denoisers.DropVariance)")
        if self.threshold is not None:
            x0 = threshold_x0(self.threshold, x0, x, sigma)
        s2, n2 = sigma * sigma, sigma_next * sigma_next
        mean = x0 + (n2 / s2) * (x - x0)
        if self.variance == "fixed_small":
            var = n2 * (s2 - n2) / s2
        elif self.variance == "learned_range":
            beta = (s2 - n2) / (1.0 + s2)
            beta_tilde = n2 * (s2 - n2) / (s2 * (1.0 + n2))
            frac = (v + 1.0) / 2.0
            log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(jnp.maximum(beta_tilde, 1e-20))
            var = jnp.where(sigma_next > 0, jnp.exp(log_var) * (1.0 + n2), 0.0)
        else:
            var = jnp.where(sigma_next > 0, (s2 - n2) * (1.0 + n2) / (1.0 + s2), 0.0)
        return mean + jnp.sqrt(jnp.maximum(var, 0.0)) * noise_like(key, x), state
