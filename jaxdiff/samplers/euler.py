"""Euler and DDIM / Euler-ancestral steps in sigma space."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn, ancestral_split, as_leaves, check_option, noise_like, threshold_x0

Array = jax.Array


@pytree_dataclass
class Euler:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, eq. 3).

    Compatible with diffusers' ``EulerDiscreteScheduler`` (no churn) step for step.
    """

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        d = (x - denoise(x, sigma)) / sigma
        return x + (sigma_next - sigma) * d, state


@pytree_dataclass
class DDIM:
    """DDIM (Song et al. 2021, eq. 12) in sigma space; ``eta = 0`` is deterministic, ``eta = 1`` ancestral.

    ``x_next = x0 + sigma_down * eps_hat + sigma_up * z`` with ``eps_hat = (x - x0) / sigma`` and the
    split of :func:`ancestral_split`. Dividing DDIM's VP update by ``sqrt(abar_next)`` gives exactly
    this, and it is also k-diffusion's Euler-ancestral step, so :class:`EulerAncestral` shares it.

    Moving upward (``sigma_next > sigma``) this step evaluates the denoiser at the *target* level on
    the current sample, as diffusers' ``DDIMInverseScheduler`` does; :func:`jaxdiff.sampling.invert`
    offers that convention as ``evaluate_at="target"`` and by default evaluates at the current level,
    which round-trips closer.

    ``threshold`` (a denoiser transform such as ``guidance.static_threshold(-1, 1)`` or
    ``guidance.dynamic_threshold(0.995, 1.0)``, or None) clips the data estimate *inside the step*
    as diffusers' ``DDIMScheduler`` does with ``clip_sample`` / ``thresholding``: the step moves from
    the clipped ``x0`` along the network's own noise estimate, ``x_next = clip(x0) + sigma_down *
    eps_hat + sigma_up * z`` with ``eps_hat`` unclipped (diffusers' default
    ``use_clipped_model_output=False``). Wrapping the *denoiser* with the same transform instead
    re-derives the noise from the clipped x0 (``use_clipped_model_output=True``); the two agree
    until the clip bites. :func:`jaxdiff.pipelines.schedulers.plan` sets this field from a DDIM
    folder's scheduler config.
    """

    eta: Array | float = 0.0
    threshold: Any = None

    def __post_init__(self) -> None:
        check_option("eta", self.eta, lambda v: v >= 0, "non-negative (0: deterministic DDIM, 1: ancestral)")
        as_leaves(self, floats=("eta",))

    def init(self, x: Array) -> tuple[()]:
        return ()

    def step(self, denoise: DenoiseFn, state: Any, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Any]:
        s_eval = jnp.maximum(sigma, sigma_next)
        eps = (x - denoise(x, s_eval)) / s_eval
        down, up = ancestral_split(s_eval, sigma_next, self.eta)
        if self.threshold is None:
            return x + (down - sigma) * eps + up * noise_like(key, x), state
        x0 = threshold_x0(self.threshold, x - sigma * eps, x, sigma)  # x - sigma eps: the estimate at this level
        return x0 + down * eps + up * noise_like(key, x), state


@pytree_dataclass
class EulerAncestral(DDIM):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``; diffusers ``EulerAncestralDiscreteScheduler``): DDIM with eta = 1 by default."""

    eta: Array | float = 1.0
