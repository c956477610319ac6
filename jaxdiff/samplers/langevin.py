"""Annealed Langevin dynamics (NCSN)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, replace, static_field
from jaxdiff.samplers._base import DenoiseFn, as_leaves, check_option, noise_like

Array = jax.Array


@pytree_dataclass
class Langevin:
    """Song & Ermon 2019, Algorithm 1: ``n_steps`` Langevin updates per noise level.

    At level ``sigma_i``: ``alpha_i = eps sigma_i^2 / sigma_L^2`` and, ``n_steps`` times,
    ``x <- x + alpha_i / 2 * score(x, sigma_i) + sqrt(alpha_i) z`` with ``score = (D(x, sigma) - x) / sigma^2``.
    ``sigma_L`` is the smallest level the dynamics run at, ``values[count - 1]`` of the schedule, set by
    :meth:`prepare` (the runner calls it) unless given. With ``final_denoise`` the step to
    ``sigma_next = 0`` ends with one denoising step ``x <- D(x, sigma_L)`` (Jolicoeur-Martineau et al.
    2021); without it the run returns the last Langevin iterate, as in Song & Ermon 2019. Use
    :func:`jaxdiff.schedules.ncsn_geometric` for the levels.
    """

    eps: Array | float = 2e-5
    n_steps: Array | int = 100
    sigma_min: Array | float | None = None
    final_denoise: bool = static_field(default=True)

    def __post_init__(self) -> None:
        check_option("eps", self.eps, lambda v: v > 0, "positive")
        check_option("n_steps", self.n_steps, lambda v: v >= 1, "a positive integer")
        check_option("sigma_min", self.sigma_min if self.sigma_min is not None else 1.0, lambda v: v > 0, "positive")
        as_leaves(self, floats=("eps", "sigma_min"), ints=("n_steps",))

    def prepare(self, sigmas: Any) -> "Langevin":
        if self.sigma_min is not None:
            return self
        return replace(self, sigma_min=sigmas.values[jnp.maximum(sigmas.count - 1, 0)])

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        if self.sigma_min is None:
            raise ValueError("Langevin needs sigma_min (sigma_L); pass it or call sampler.prepare(sigmas) first")
        alpha = self.eps * (sigma / self.sigma_min) ** 2

        def update(t: Array, x: Array) -> Array:
            score = (denoise(x, sigma) - x) / (sigma * sigma)
            return x + 0.5 * alpha * score + jnp.sqrt(alpha) * noise_like(jax.random.fold_in(key, t), x)

        x = jax.lax.fori_loop(0, self.n_steps, update, x)
        if not self.final_denoise:
            return x, state
        return jax.lax.cond(sigma_next > 0, lambda: x, lambda: denoise(x, sigma)), state
