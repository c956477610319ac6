"""The sampler contract shared by every solver in :mod:`jaxdiff.samplers`.

A sampler is a frozen pytree dataclass with two pure methods (DESIGN.md, "Schedules and samplers"):

- ``init(x) -> state``: the multistep memory before the first step (a fixed-structure pytree);
- ``step(denoise, state, x, sigma, sigma_next, key) -> (x_next, state)``: one move from noise level
  ``sigma`` to ``sigma_next``. ``denoise(x, sigma)`` is the denoiser with its conditioning bound.

and one optional method, ``prepare(sigmas) -> sampler``, which the runner calls once (inside the
compiled program) with the traced schedule, for samplers whose maths depends on the whole schedule
(Heun's churn divides by the step count; annealed Langevin scales by the smallest level).

Numeric hyper-parameters (eta, churn, SNR...) are pytree leaves, so changing them never recompiles;
:func:`as_leaves` stores them as float32 (counts as int32) arrays, so ``DDIM(eta=0)`` and
``DDIM(eta=0.0)`` share one compiled program too.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxdiff._util import as_leaves as as_leaves  # noqa: F401 (samplers import it from here)

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


class Sampler(Protocol):
    def init(self, x: Array) -> Any: ...

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]: ...


def prepare(sampler: Any, sigmas: Any) -> Any:
    """``sampler.prepare(sigmas)`` when the sampler defines it, else the sampler unchanged."""
    hook = getattr(sampler, "prepare", None)
    return sampler if hook is None else hook(sigmas)


def ancestral_split(sigma: Array, sigma_next: Array, eta: Array | float = 1.0) -> tuple[Array, Array]:
    """Split a move sigma -> sigma_next into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)`` (capped at sigma_next) and
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``: the DDPM posterior variance in VE coordinates.
    """
    up = jnp.minimum(sigma_next, eta * jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2), 0.0)) / sigma)
    down = jnp.sqrt(jnp.maximum(sigma_next**2 - up**2, 0.0))
    return down, up


def noise_like(key: Array, x: Array) -> Array:
    """Standard normal noise with the shape and dtype of x."""
    return jax.random.normal(key, x.shape, x.dtype)


def per_sample_norm(v: Array) -> Array:
    """Euclidean norm of each sample, shaped (B, 1, ...) to broadcast against ``v``."""
    n = jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
    return n


def check_option(name: str, value: Any, ok: Callable[[np.ndarray], Any], requirement: str) -> None:
    """Validate a numeric option when it is concrete (tracers and placeholders pass through unchecked).

    ``__post_init__`` also runs under ``jit`` (``prepare`` builds samplers from traced values), so
    only Python numbers, NumPy values and concrete JAX arrays are checked.
    """
    concrete = isinstance(value, (int, float, np.ndarray, np.number)) or (
        isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer))
    if concrete and not np.all(ok(np.asarray(value))):
        raise ValueError(f"sampler option {name} must be {requirement}, got {value!r}")


def threshold_x0(threshold: Any, x0: Array, x: Array, sigma: Array) -> Array:
    """Apply a denoiser transform (``denoiser -> denoiser``, e.g. :func:`jaxdiff.guidance.static_threshold`)
    to a data estimate already computed: the transform wraps a denoiser that returns ``x0``.

    This is how a sampler clips x0 inside its step (diffusers' ``clip_sample`` / ``thresholding``)
    without the clipped value leaking into the noise estimate.
    """
    return threshold(lambda x_, sigma_, cond=None: x0)(x, sigma)
