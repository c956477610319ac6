"""Conditional sampling of unknown entries given known ones (frames of a video, pixels of an image).

Two denoiser -> denoiser transforms in the algebra of :mod:`jaxdiff.guidance`, for video extension and
frame interpolation (Ho et al. 2022, "Video Diffusion Models", Sec. 3.1): the known data ``known`` sits
where ``mask`` is 1 (the paper's ``x^a``), the entries to generate where it is 0 (``x^b``). Both
``known`` and ``mask`` are traced leaves broadcastable to the sample, so new clips, new masks and new
weights reuse one compiled sampling loop.

A separate module rather than :mod:`jaxdiff.guidance` because both transforms share the masked-data
plumbing and nothing else there needs it; :mod:`jaxdiff.guidance` re-exports nothing from here.

Coordinates are jaxdiff's EDM / variance-exploding ones, ``x = x0 + sigma * noise``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform, float_leaf
from jaxdiff._util import as_leaves, batch_sigma, expand_to

Array = jax.Array
Denoiser = Callable[..., Array]


def _check_known(known: Array, mask: Array, x: Array) -> tuple[Array, Array]:
    """``known`` and ``mask`` in ``x``'s dtype, broadcast to ``x``'s shape (one clear error otherwise)."""
    try:
        shape = jnp.broadcast_shapes(jnp.shape(known), jnp.shape(mask), x.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"known {jnp.shape(known)} and mask {jnp.shape(mask)} must broadcast to the sample's shape "
                         f"{x.shape}; give them the sample's shape (e.g. (B, F, H, W, C)) or size-1 axes")
    return (jnp.broadcast_to(jnp.asarray(known).astype(x.dtype), x.shape),
            jnp.broadcast_to(jnp.asarray(mask).astype(x.dtype), x.shape))


@pytree_dataclass
class Replacement:
    """The replacement method (Song et al. 2021, App. I.2 imputation; the baseline of Ho et al. 2022, Sec. 3.1).

    ``D'(x) = mask * known + (1 - mask) * D(x)``: the known entries of the x0 estimate are replaced by
    the known data, the unknown entries are the unconditional model's estimate ``D^b(x)`` given the
    whole noisy ``x`` (known entries included). What this does to the sampler's state: every sampler
    moves ``x`` toward ``D'`` (``x - D' = sigma * eps_hat``), so on the known entries the implied noise
    is ``eps^a = (x^a - known) / sigma`` and the known entries stay at ``x^a = known + sigma * eps^a``,
    a draw of the forward process ``q(x_sigma^a | x^a)``: the ODE samplers (Euler, Heun, DPM-Solver)
    keep the initial noise (``x^a`` shrinks onto ``known`` as sigma falls), the ancestral / SDE samplers
    mix in fresh noise, which is Song et al.'s re-noised replacement. At sigma = 0, ``x^a = known``
    exactly. The unknown entries only ever see ``known`` through the noisy ``x^a``; Ho et al. find the
    result incoherent with ``known``, which :class:`ReconstructionGuidance` corrects.
    """

    inner: Denoiser
    known: Array
    mask: Array

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        known, mask = _check_known(self.known, self.mask, x)
        x0 = self.inner(x, sigma, cond)
        return mask * known + (1 - mask) * x0


@pytree_dataclass
class ReconstructionGuidance:
    """Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", Sec. 3.1, eq. 7) in EDM coordinates.

    The paper (variance-preserving ``z_t = alpha_t x + sigma_t eps``) approximates
    ``q(x^a | z_t) ~ N(x_hat^a(z_t), sigma_t^2 / alpha_t^2 I)`` and adds
    ``(sigma_t^2 / alpha_t) grad_{z_t^b} log q(x^a | z_t)`` to ``E[x^b | z_t]``, giving eq. 7:
    ``x~^b = x_hat^b - (w_r alpha_t / 2) grad_{z_t^b} ||x^a - x_hat^a(z_t)||^2``.

    In jaxdiff's coordinates ``x = z_t / alpha_t`` and ``sigma = sigma_t / alpha_t`` (so
    ``alpha_t = 1 / sqrt(1 + sigma^2)``); Tweedie reads ``E[x0 | x, x^a] = D(x) + sigma^2 grad_x log q(x^a | x)``
    and the approximation ``q(x^a | x) ~ N(D^a(x), sigma^2 I)`` gives
    ``sigma^2 grad_{x^b} log q = -(1/2) grad_{x^b} ||x^a - D^a(x)||^2``. The chain rule
    ``grad_{z_t} = grad_x / alpha_t`` absorbs the paper's ``alpha_t``: its equivalent here is 1::

        D'^b(x) = D^b(x) - (w_r / 2) grad_{x^b} ||known - D^a(x)||^2
                = D^b(x) - w_r [J_D(x)^T (mask * (D(x) - known))]^b

    with ``J_D`` the denoiser's Jacobian (one vector-Jacobian product through ``inner``, inside the
    compiled loop). ``weight`` (``w_r``; Ho et al. use large values, w_r > 1) is a float leaf, a scalar
    or per-sample (B,). With ``replace=True`` (default) the known entries of the estimate are also
    replaced by ``known``, as :class:`Replacement` does, so the known frames come out exactly and
    ``weight = 0`` *is* the replacement method; ``replace=False`` applies eq. 7 alone (the known
    entries keep ``D^a(x)``, and ``weight = 0`` is the inner denoiser). Put it after classifier-free guidance
    (``apply(model, classifier_free(...), reconstruction_guidance(...))``) so the guided estimate is the
    one reconstructed; the gradient then runs through both CFG branches.
    """

    inner: Denoiser
    known: Array
    mask: Array
    weight: Array = 1.0
    replace: bool = static_field(default=True)

    def __post_init__(self) -> None:
        as_leaves(self, floats=("weight",))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        known, mask = _check_known(self.known, self.mask, x)
        sigma = batch_sigma(sigma, x)
        x0, vjp = jax.vjp(lambda x_: self.inner(x_, sigma, cond), x)
        # grad_x (1/2) ||known - D^a(x)||^2 = J_D^T (mask * (D(x) - known))
        (half_grad,) = vjp(mask * (x0 - known))
        w = expand_to(jnp.asarray(self.weight, jnp.float32).astype(x.dtype), x)
        guided = x0 - w * (1 - mask) * half_grad.astype(x.dtype)
        return mask * known + (1 - mask) * guided if self.replace else guided


def replacement(known: Any, mask: Any) -> Transform:
    """The replacement method as a transform; see :class:`Replacement`. ``mask`` is 1 on known entries."""
    return Transform(Replacement, dict(known=jnp.asarray(known), mask=float_leaf(mask)))


def reconstruction_guidance(known: Any, mask: Any, weight: Any = 1.0, *, replace: bool = True) -> Transform:
    """Reconstruction guidance (Ho et al. 2022, eq. 7) as a transform; see :class:`ReconstructionGuidance`."""
    return Transform(ReconstructionGuidance, dict(known=jnp.asarray(known), mask=float_leaf(mask),
                                                  weight=float_leaf(weight)), (("replace", bool(replace)),))


def frame_mask(num_frames: int, known_frames: Any, frame_axis_shape: tuple[int, ...] = (1, 1, 1)) -> Array:
    """A mask (1, F, 1, 1, 1) (or ``(1, F) + frame_axis_shape``) with 1 on the frame indices ``known_frames``.

    E.g. extension of an 8-frame clip to 16: ``frame_mask(16, range(8))``; interpolation of every
    other frame: ``frame_mask(16, range(0, 16, 2))``.
    """
    idx = jnp.asarray(list(known_frames), jnp.int32)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= num_frames):
        raise ValueError(f"known frame indices must lie in [0, {num_frames}), got {list(map(int, idx))}")
    m = jnp.zeros((num_frames,), jnp.float32).at[idx].set(1.0)
    return m.reshape((1, num_frames) + tuple(frame_axis_shape))
