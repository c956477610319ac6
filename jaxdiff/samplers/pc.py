"""Predictor-corrector sampling of the VE SDE (score_sde)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn, as_leaves, check_option, noise_like, per_sample_norm

Array = jax.Array


@pytree_dataclass
class PredictorCorrector:
    """Song et al. 2021, Algorithms 2 and 4 (VE SDE, in sigma space): Langevin corrector + reverse-diffusion predictor.

    Corrector, ``n_corrector`` times at level ``sigma``: ``g = score(x, sigma)``,
    ``e = 2 (snr ||z|| / ||g||)^2``, ``x <- x + e g + sqrt(2 e) z``. The norms are per-sample norms averaged
    over the batch, as score_sde's ``LangevinCorrector`` computes them: per-sample step sizes explode
    near a mode's centre, where the score vanishes (badly so in low dimension).
    Predictor (reverse diffusion, eq. 47): ``x' = x + (sigma^2 - sigma'^2) g + sqrt(sigma^2 - sigma'^2) z``;
    its noise is dropped on the step to ``sigma' = 0``, which returns ``D(x, sigma)`` (score_sde's
    ``denoise=True``). The order corrector-then-predictor within a step is score_sde's ``pc_sampler``.
    """

    snr: Array | float = 0.16
    n_corrector: Array | int = 1

    def __post_init__(self) -> None:
        check_option("snr", self.snr, lambda v: v >= 0, "non-negative")
        check_option("n_corrector", self.n_corrector, lambda v: v >= 0, "a non-negative integer")
        as_leaves(self, floats=("snr",), ints=("n_corrector",))

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        def corrector(j: Array, x: Array) -> Array:
            z = noise_like(jax.random.fold_in(key, j + 1), x)
            g = (denoise(x, sigma) - x) / (sigma * sigma)
            e = 2.0 * (self.snr * jnp.mean(per_sample_norm(z)) / jnp.maximum(jnp.mean(per_sample_norm(g)), 1e-30)) ** 2
            return x + e * g + jnp.sqrt(2.0 * e) * z

        x = jax.lax.fori_loop(0, self.n_corrector, corrector, x)
        dv = jnp.maximum(sigma * sigma - sigma_next * sigma_next, 0.0)
        x_mean = x + (dv / (sigma * sigma)) * (denoise(x, sigma) - x)
        noise = jnp.where(sigma_next > 0, jnp.sqrt(dv), 0.0) * noise_like(jax.random.fold_in(key, 0), x)
        return x_mean + noise, state
