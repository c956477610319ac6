"""Resampling (self-recurrence): each step taken several times, re-noised back in between."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn, as_leaves, check_option, noise_like, prepare

Array = jax.Array


@pytree_dataclass
class Resample:
    """Take each move ``sigma -> sigma_next`` of ``sampler`` ``repeats`` times, re-noising in between.

    After every pass but the last, the result is carried back to level ``sigma`` by the forward process
    (VE coordinates: ``x <- x_next + sqrt(sigma^2 - sigma_next^2) z``, fresh ``z``) and the step is taken again.
    This is the "self-recurrence" of universal guidance (Bansal et al. 2023, Algorithm 1, ``k`` recurrence
    steps: guidance gets ``repeats`` chances per level to steer the sample while it stays on the model's
    noise manifold) and RePaint's resampling with jump length 1 (Lugmayr et al. 2022, Algorithm 1, ``U``
    resamplings). ``repeats = 1`` is ``sampler`` itself.

    A multistep solver's memory belongs to the trajectory it was built on, which a re-noised sample has left: the
    first pass starts from the memory held before the move, every later one from fresh memory (``init``: the
    solver's first-order step, e.g. DDIM for DPM-Solver++(2M)), and the last pass's memory goes on to the next
    level. ``repeats`` is a traced leaf: changing it does not recompile.
    """

    sampler: Any
    repeats: Array | int = 2

    def __post_init__(self) -> None:
        check_option("repeats", self.repeats, lambda v: v >= 1, "a whole number >= 1 (1: no resampling)")
        as_leaves(self, ints=("repeats",))

    def prepare(self, sigmas: Any) -> "Resample":
        return dataclasses.replace(self, sampler=prepare(self.sampler, sigmas))

    def init(self, x: Array) -> Any:
        return self.sampler.init(x)

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        lift = jnp.sqrt(jnp.maximum(sigma * sigma - sigma_next * sigma_next, 0.0))
        fresh = self.sampler.init(x)

        def memory(first_pass: Array) -> Any:
            return jax.tree.map(lambda held, new: jnp.where(first_pass, held, new), state, fresh)

        def again(r: Array, x: Array) -> Array:
            pass_key = jax.random.fold_in(key, 2 * r + 1)
            x_next, _ = self.sampler.step(denoise, memory(r == 0), x, sigma, sigma_next, pass_key)
            return x_next + lift * noise_like(jax.random.fold_in(key, 2 * r + 2), x)

        x = jax.lax.fori_loop(0, self.repeats - 1, again, x)
        return self.sampler.step(denoise, memory(self.repeats == 1), x, sigma, sigma_next, key)
