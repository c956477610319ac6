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
from jaxdiff.samplers._base import prepare as _prepare
from jaxdiff.samplers.euler import DDIM
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
    sampler = _prepare(sampler, sigmas)

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


def _trajectory(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array, cond: Any) -> tuple[Array, Any]:
    denoise = lambda x_, s_: denoiser(x_, s_, cond)  # noqa: E731
    sampler = _prepare(sampler, sigmas)

    def body(carry: tuple[Array, Any], i: Array) -> tuple[tuple[Array, Any], Array]:
        def run() -> tuple[Array, Any]:
            return sampler.step(denoise, carry[1], carry[0], sigmas.values[i], sigmas.values[i + 1],
                                jax.random.fold_in(key, i))

        carry = jax.lax.cond(i < sigmas.count, run, lambda: carry)
        return carry, carry[0]

    (_, state), xs = jax.lax.scan(body, (x, sampler.init(x)), jnp.arange(sigmas.capacity))
    return jnp.concatenate([x[None], xs]), state


trajectory_jit = jax.jit(_trajectory)


def trajectory(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array | int = 0,
               cond: Any = None) -> tuple[Array, Any]:
    """Like :func:`sample` but keeping every step: ``(xs, final_state)`` with ``xs[i]`` at ``sigmas.values[i]``.

    ``xs`` has ``capacity + 1`` entries (a ``lax.scan`` over the capacity; entries past ``count`` repeat
    the result), so build the schedule with a small capacity. Same per-step keys as :func:`sample`.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    check_sigmas(sigmas)
    _check_cond(x, cond)
    return trajectory_jit(denoiser, sampler, sigmas, x, key, cond)


def _invert(denoiser: Any, x0: Array, sigmas: Sigmas, cond: Any, start: Array) -> Array:
    denoise = lambda x_, s_: denoiser(x_, s_, cond)  # noqa: E731
    ddim, count, v = DDIM(eta=0.0), sigmas.count, sigmas.values
    key = jax.random.key(0)  # unused: eta = 0 adds no noise

    def body(j: Array, x: Array) -> Array:
        return ddim.step(denoise, (), x, v[count - j], v[count - j - 1], key)[0]

    return jax.lax.fori_loop(0, count - start, body, x0)


invert_jit = jax.jit(_invert)


def invert(denoiser: Any, x0: Array, sigmas: Sigmas, cond: Any = None, *, start: int | Array = 0) -> Array:
    """DDIM inversion (Song et al. 2021, Sec. 4.3; Mokady et al. 2023): run DDIM (eta = 0) *up* the used levels.

    Starts from ``x0`` at the schedule's final level (``sigmas.values[count]``, usually 0) and returns the
    latent at ``sigmas.values[start]``, so ``sample(denoiser, DDIM(), sigmas, invert(...), start=start)``
    reconstructs ``x0`` up to the discretisation error. Each upward move evaluates the denoiser at the
    target level (diffusers' ``DDIMInverseScheduler`` convention; see :class:`jaxdiff.samplers.DDIM`).
    """
    check_sigmas(sigmas)
    if not isinstance(start, jax.core.Tracer) and not 0 <= int(start) < int(sigmas.count):
        raise ValueError(f"start must be in [0, {int(sigmas.count)}) for this schedule, got {int(start)}")
    _check_cond(x0, cond)
    return invert_jit(denoiser, x0, sigmas, cond, jnp.asarray(start, jnp.int32))
