"""The runner: one jit-compiled loop over a padded schedule with a traced step count.

``sample(denoiser, sampler, sigmas, x, key, cond)`` runs ``sigmas.count`` steps of ``sampler`` inside a
single ``lax.fori_loop``. The denoiser, sampler, schedule, key and conditioning are all traced, so
changing the number of steps (up to the schedule's capacity), a guidance scale, eta, the seed or the
prompt reuses the same compiled program. Per-step keys are ``fold_in(key, i)``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import progress as _progress
from jaxdiff.schedules import Sigmas, check_sigmas

Array = jax.Array


class SampleInfo(NamedTuple):
    """What a run reports besides the sample: the sampler's final state and the first non-finite step (-1: none)."""

    state: Any
    first_nonfinite_step: Array


def initial_noise(key: Array, shape: tuple[int, ...], sigma_max: Array, sigma_data: float = 0.0,
                  dtype: Any = jnp.float32) -> Array:
    """Start of a run: ``noise * sqrt(sigma_max^2 + sigma_data^2)``.

    ``sigma_data = 0`` gives k-diffusion's ``noise * sigma_max``; ``sigma_data = 1`` is the exact
    marginal of a VP model at its last step (``x_T ~ N(0, I)`` in VP coordinates), which the
    diffusers schedulers use (``init_noise_sigma``).
    """
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(jnp.asarray(sigma_max) ** 2 + sigma_data**2)


def _loop(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array, cond: Any,
          progress: bool, start: Array | int = 0) -> tuple[Array, SampleInfo]:
    denoise = lambda x_, s_: denoiser(x_, s_, cond)  # noqa: E731
    count = sigmas.count

    def body(i: Array, carry: tuple[Array, Any, Array]) -> tuple[Array, Any, Array]:
        x, state, bad = carry
        x, state = sampler.step(denoise, state, x, sigmas.values[i], sigmas.values[i + 1], jax.random.fold_in(key, i))
        bad = jnp.where((bad < 0) & ~jnp.all(jnp.isfinite(x)), i, bad)
        if progress:
            _progress.report(i - start, count - start)
        return x, state, bad

    carry = (x, sampler.init(x), jnp.asarray(-1, jnp.int32))
    x, state, bad = jax.lax.fori_loop(jnp.asarray(start, jnp.int32), count, body, carry)
    return x, SampleInfo(state, bad)


sample_jit = jax.jit(_loop, static_argnames=("progress",))
"""The pure compiled loop: ``sample_jit(denoiser, sampler, sigmas, x, key, cond, progress, start)``."""


def _check_cond(x: Array, cond: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(cond):
        shape = getattr(leaf, "shape", ())
        if len(shape) >= 1 and shape[0] != x.shape[0]:
            raise ValueError(f"conditioning has batch size {shape[0]} but x has batch size {x.shape[0]}; "
                             "give one conditioning entry per sample (jnp.broadcast_to / jnp.repeat)")


def sample(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array | int = 0, cond: Any = None, *,
           start: int | Array = 0, progress: bool = False, check_finite: bool = True,
           return_info: bool = False) -> Array | tuple[Array, SampleInfo]:
    """Run ``sampler`` from ``x`` (a sample at noise level ``sigmas.values[start]``) down the schedule.

    ``start`` skips the first steps (SDEdit / image-to-image strength). With ``check_finite`` a run that
    produced NaN or Inf raises ``FloatingPointError`` naming the step where it began. Inside another
    ``jax.jit`` the checks that need concrete values are skipped; use :data:`sample_jit` there.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    concrete = not isinstance(sigmas.count, jax.core.Tracer) and not isinstance(sigmas.values, jax.core.Tracer)
    if concrete:
        check_sigmas(sigmas)
        if not isinstance(start, jax.core.Tracer) and not 0 <= int(start) < int(sigmas.count):
            raise ValueError(f"start must be in [0, {int(sigmas.count)}) for this schedule, got {int(start)}")
    _check_cond(x, cond)
    out, info = sample_jit(denoiser, sampler, sigmas, x, key, cond, progress, start)
    bad = info.first_nonfinite_step
    if check_finite and not isinstance(bad, jax.core.Tracer) and int(bad) >= 0:
        i = int(bad)
        s = np.asarray(sigmas.values)
        raise FloatingPointError(f"sampling produced NaN/Inf first at step {i} (sigma {s[i]:g} -> {s[i + 1]:g}); "
                                 "check the denoiser's output at that noise level, the dtype, or lower the guidance scale")
    return (out, info) if return_info else out
