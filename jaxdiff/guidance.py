"""Guidance and other denoiser -> denoiser transforms (DESIGN.md, "One idea: the denoiser").

Each transform is a frozen pytree dataclass holding the wrapped denoiser ``inner`` (a child pytree)
and its numeric settings as traced leaves, so changing a guidance scale, a label or a threshold
never recompiles the sampling loop. Following optax, lower-case factories return a *transform*
(a pytree callable ``denoiser -> denoiser``) and :func:`chain` / :func:`apply` compose them in
order, the first transform wrapping the denoiser innermost::

    guided = apply(model, classifier_free(7.5, uncond=empty_prompt), dynamic_threshold(0.995, 1.5))

All maths is in the EDM / variance-exploding coordinates ``x = x0 + sigma * noise`` of
:mod:`jaxdiff.denoisers`, where a score shift ``delta`` becomes the denoiser shift
``sigma^2 * delta`` (Tweedie: ``D = x + sigma^2 grad log p_sigma(x)``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff import _transforms
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import as_pytree_callable, float_leaf
from jaxdiff._util import as_leaves, batch_sigma, expand_to
from jaxdiff.denoisers import join_variance, split_variance

Array = jax.Array
Denoiser = Callable[..., Array]
RESCALE_SPACES = ("epsilon", "v", "x0")


# ---- helpers ---------------------------------------------------------------------------------

def _per_sample(v: Array, like: Array) -> Array:
    """A scalar or per-sample (B,) setting, cast to ``like``'s dtype and shaped to broadcast against it."""
    return expand_to(jnp.asarray(v).astype(like.dtype), like)


def _std(u: Array) -> Array:
    """Per-sample standard deviation over all non-batch axes, shaped (B, 1, ..., 1)."""
    return jnp.std(u, axis=tuple(range(1, u.ndim)), keepdims=True)


# ---- classifier-free guidance ----------------------------------------------------------------

def stack_cond(cond: Any, uncond: Any) -> Any:
    """Concatenate ``cond`` and ``uncond`` leaf by leaf along the batch axis (conditional first).

    An ``uncond`` leaf must have the shape of its ``cond`` leaf, or that shape with a batch
    dimension of 1 (it is then broadcast to the batch).
    """
    c_leaves, c_def = jax.tree_util.tree_flatten(cond)
    u_leaves, u_def = jax.tree_util.tree_flatten(uncond)
    if c_def != u_def:
        raise ValueError(f"the unconditional (negative) conditioning must have the structure of the conditioning, "
                         f"got {u_def} for uncond and {c_def} for cond; build uncond like cond (e.g. an empty prompt)")
    out = []
    for i, (c, u) in enumerate(zip(c_leaves, u_leaves)):
        c, u = jnp.asarray(c), jnp.asarray(u)
        if c.ndim == 0:
            raise ValueError(f"conditioning leaf {i} is a scalar; classifier-free guidance needs a leading batch axis")
        if u.shape != c.shape:
            if u.ndim == c.ndim and u.shape[0] == 1 and u.shape[1:] == c.shape[1:]:
                u = jnp.broadcast_to(u, c.shape)
            else:
                raise ValueError(f"conditioning leaf {i}: uncond has shape {u.shape} but cond has shape {c.shape}; "
                                 "uncond must match cond, or have batch size 1 to be broadcast")
        out.append(jnp.concatenate([c, u.astype(c.dtype)], axis=0))
    return jax.tree_util.tree_unflatten(c_def, out)


def _rescale_coeffs(space: str, sigma: Array, like: Array) -> tuple[Array, Array]:
    """``(a, b)`` with the prediction in ``space`` proportional (per sample) to ``a x + b x0``.

    epsilon: ``eps = (x - x0) / sigma``. v (Salimans & Ho 2022, ``v = alpha eps - sigma_vp x0`` with
    ``alpha = 1/c``, ``sigma_vp = sigma/c``, ``c = sqrt(1 + sigma^2)``): ``v = (x - c^2 x0) / (sigma c)``.
    x0: itself. The per-sample factor cancels in the std ratio, so sigma = 0 never divides.
    """
    one = jnp.ones((), like.dtype)
    if space == "epsilon":
        return one, -one
    if space == "v":
        s = expand_to(sigma, like)
        return one, -(1.0 + s * s)
    return jnp.zeros((), like.dtype), one


def rescale_guidance(x: Array, sigma: Array, x0_cfg: Array, x0_cond: Array, phi: Array,
                     space: str = "epsilon") -> Array:
    """Guidance rescale (Lin et al. 2024, eq. 15-16; diffusers ``rescale_noise_cfg``) on x0 estimates.

    In ``space``: ``u_rescaled = u_cfg * std(u_cond) / std(u_cfg)``, ``u = phi u_rescaled + (1 - phi) u_cfg``,
    std over all non-batch axes (the ratio makes torch's unbiased std and numpy's agree). The maps
    to each space are affine in x0 with the same x, so the mix is done on x0 directly, in at least
    float32 (the result has ``x0_cfg``'s dtype).
    """
    if space not in RESCALE_SPACES:
        raise ValueError(f"unknown rescale_space {space!r}; valid: {', '.join(RESCALE_SPACES)}")
    dtype = x0_cfg.dtype
    x, x0_cfg, x0_cond = (v.astype(jnp.promote_types(dtype, jnp.float32)) for v in (x, x0_cfg, x0_cond))
    a, b = _rescale_coeffs(space, batch_sigma(sigma, x), x)
    u_cfg, u_cond = a * x + b * x0_cfg, a * x + b * x0_cond
    std_cfg, std_cond = _std(u_cfg), _std(u_cond)
    ratio = jnp.where(std_cfg > 0, std_cond / jnp.where(std_cfg > 0, std_cfg, 1.0), 1.0)
    rescaled = (ratio * u_cfg - a * x) / b
    return (x0_cfg + _per_sample(phi, x) * (rescaled - x0_cfg)).astype(dtype)


@pytree_dataclass
class ClassifierFree:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with ``scale = 1 + w``): ``D = D_u + scale (D_c - D_u)``.

    One batched call of ``inner`` on ``concat([x, x])`` with the runner's conditioning stacked on
    ``uncond`` (the unconditional or negative conditioning). ``scale = 1`` is the conditional
    denoiser, ``0`` the unconditional one. Every parameterisation maps its network output to x0
    affinely with the same ``x``, so combining x0 estimates equals diffusers' combination of
    noise (or v) predictions. ``rescale`` (phi) applies :func:`rescale_guidance` in
    ``rescale_space``: ``"epsilon"`` (diffusers rescales the network output, eps for eps-models),
    ``"v"`` for v-prediction models, or ``"x0"``. ``scale`` and ``rescale`` may be per-sample (B,).

    A learned-variance denoiser (output channels beyond ``x``'s: :func:`jaxdiff.denoisers.split_variance`) is
    guided on its mean only; the variance channels come from the conditional half, as GLIDE, DeepFloyd IF and
    unCLIP do.
    """

    inner: Denoiser
    scale: Array
    uncond: Any
    rescale: Array = 0.0
    rescale_space: str = static_field(default="epsilon")

    def __post_init__(self) -> None:
        as_leaves(self, floats=("scale", "rescale"))
        if self.rescale_space not in RESCALE_SPACES:
            raise ValueError(f"unknown rescale_space {self.rescale_space!r}; valid: {', '.join(RESCALE_SPACES)}")

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        both = self.inner(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), stack_cond(cond, self.uncond))
        (c, variance), (u, _) = (split_variance(half, x) for half in jnp.split(both, 2, axis=0))
        guided = u + _per_sample(self.scale, x) * (c - u)
        return join_variance(rescale_guidance(x, sigma, guided, c, self.rescale, self.rescale_space), variance)


# ---- classifier guidance ---------------------------------------------------------------------

def _selected_log_prob(logp: Array, labels: Array) -> Array:
    """``logp[b, labels[b]]``, and 0 where the label is negative (no guidance for that sample)."""
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    return jnp.where(labels >= 0, picked, 0.0)


@pytree_dataclass
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021): ``D' = D + scale sigma^2 grad_x log p(y | x, sigma)``.

    Bayes' rule gives ``grad log p(x | y) = grad log p(x) + grad log p(y | x)``; by Tweedie a score
    shift is a denoiser shift times sigma^2. This is exactly ADM's Alg. 2 (DDIM),
    ``eps' = eps - sqrt(1 - abar) grad_{x_vp}``, since ``sqrt(1 - abar) grad_{x_vp} = sigma grad_x`` and
    ``x0 = x - sigma eps``; with an ancestral sampler it is the score-shift form of Alg. 1, whose
    mean shift ``scale Sigma grad`` agrees to first order in the step.
    ``classifier(x, sigma) -> (B, C)`` log-probabilities or logits (``normalize`` applies
    ``log_softmax``). A label of -1 leaves that sample unguided.

    Who receives the runner's ``cond`` (each piece of conditioning has exactly one consumer):

    - ``labels=None`` (default): ``cond`` *is* the labels (B,), read by the classifier only. The inner
      denoiser is called **unconditionally** (``cond=None``), so ``D = D_u`` and, at scale 1 with the
      exact posterior, ``D'`` is the exact class-conditional denoiser. ``condition_inner=True`` also
      gives the labels to the inner denoiser (ADM's guided *conditional* model, ``D_c`` + shift).
    - ``labels`` given (a leaf, changeable without recompiling): the runner's ``cond`` belongs to the
      inner denoiser and is passed to it unchanged.

    An inner denoiser that needs its own conditioning while the labels come through ``cond`` is
    bound first (:func:`bind`), e.g. a text-conditional model guided by a class classifier::

        guided = apply(model, bind(prompt_embedding), classifier_guidance(clf, scale=2.0))
        sample(guided, sampler, sigmas, x, key, cond=labels)
    """

    inner: Denoiser
    classifier: Callable[[Array, Array], Array]
    scale: Array
    labels: Any = None
    normalize: bool = static_field(default=True)
    condition_inner: bool = static_field(default=False)

    def __post_init__(self) -> None:
        as_leaves(self, floats=("scale",))

    def log_prob(self, x: Array, sigma: Array, labels: Array) -> Array:
        """``sum_b log p(labels[b] | x[b], sigma[b])``."""
        logp = self.classifier(x, batch_sigma(sigma, x))
        if logp.ndim != 2 or logp.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return (batch, classes) = ({x.shape[0]}, C) log-probabilities "
                             f"or logits, got shape {logp.shape}")
        if self.normalize:
            logp = jax.nn.log_softmax(logp, axis=-1)
        return jnp.sum(_selected_log_prob(logp, labels))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        if self.labels is None:
            labels, inner_cond = cond, (cond if self.condition_inner else None)
        else:
            labels, inner_cond = self.labels, cond
        if labels is None:
            raise ValueError("classifier guidance needs class labels: pass labels= to classifier_guidance "
                             "or give the labels (B,) as the conditioning")
        labels = jnp.asarray(labels)
        if labels.shape != (x.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers of shape (batch,) = ({x.shape[0]},), got {labels.dtype} "
                             f"{labels.shape}; to condition the inner denoiser on something else, bind it first "
                             "(apply(model, bind(c), classifier_guidance(clf))) or pass labels= explicitly")
        sigma = batch_sigma(sigma, x)
        grad = jax.grad(self.log_prob)(x, sigma, labels)
        s = expand_to(sigma, x)
        return self.inner(x, sigma, inner_cond) + _per_sample(self.scale, x) * s * s * grad.astype(x.dtype)


# ---- energy (loss) guidance ------------------------------------------------------------------

@pytree_dataclass
class EnergyGuidance:
    """Guidance by the gradient of a differentiable loss of the x0 estimate (SDG, Liu et al. 2023; universal guidance).

    Tilting the data by ``exp(-scale * loss(x0))`` and approximating ``E[loss | x]`` by
    ``loss(D(x))`` shifts the score by ``-scale grad_x loss(D(x))``, hence
    ``D'(x) = D(x) - scale sigma^2 grad_x sum_b loss(D(x), cond)_b``. With ``through_denoiser``
    the gradient is the chain rule ``J_D(x)^T grad loss(x0)`` (one vector-Jacobian product of the
    network); without it the Jacobian is taken as identity (``grad`` w.r.t. x0_hat only, cheaper;
    ``J_D = Cov[x0 | x] / sigma^2 -> I`` as sigma -> 0). ``loss_fn(x0_hat, cond) -> (B,)``.
    """

    inner: Denoiser
    loss_fn: Callable[[Array, Any], Array]
    scale: Array
    through_denoiser: bool = static_field(default=True)

    def __post_init__(self) -> None:
        as_leaves(self, floats=("scale",))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        x0, grad = loss_gradient(self.inner, self.loss_fn, x, sigma, cond, self.through_denoiser)
        s = expand_to(sigma, x)
        return x0 - _per_sample(self.scale, x) * s * s * grad


def loss_gradient(inner: Denoiser, loss_fn: Callable[[Array, Any], Array], x: Array, sigma: Array, cond: Any,
                  through_denoiser: bool) -> tuple[Array, Array]:
    """``(x0_hat, grad_x sum_b loss(x0_hat, cond)_b)`` in ``x``'s dtype; without ``through_denoiser`` the
    gradient is taken with respect to ``x0_hat`` (the denoiser's Jacobian as identity). ``sigma``: (B,)."""
    def total(x0: Array) -> Array:
        loss = loss_fn(x0, cond)
        if jnp.ndim(loss) > 1:
            raise ValueError(f"loss_fn must return one loss per sample (batch,), got shape {jnp.shape(loss)}")
        return jnp.sum(loss)

    if through_denoiser:
        x0, vjp = jax.vjp(lambda x_: inner(x_, sigma, cond), x)
        (grad,) = vjp(jax.grad(total)(x0))
    else:
        x0 = inner(x, sigma, cond)
        grad = jax.grad(total)(x0)
    return x0, grad.astype(x.dtype)


# ---- thresholding ----------------------------------------------------------------------------

@pytree_dataclass
class StaticThreshold:
    """Static thresholding (Saharia et al. 2022, Sec. 2.3): clip x0 to ``[low, high]`` (diffusers ``clip_sample``).

    Wrapping the denoiser, any sampler then steps with the noise implied by the clipped x0 (diffusers'
    DDIM with ``use_clipped_model_output=True``). diffusers' default DDIM keeps the network's own noise
    estimate: pass the transform as ``samplers.DDIM(threshold=static_threshold(...))`` for that.
    For DDPM, DPM-Solver++ and UniPC the two placements agree with diffusers. Learned-variance channels pass
    through unclipped (as do :class:`DynamicThreshold`'s).
    """

    inner: Denoiser
    low: Array = -1.0
    high: Array = 1.0

    def __post_init__(self) -> None:
        as_leaves(self, floats=("low", "high"))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        x0, variance = split_variance(self.inner(x, sigma, cond), x)
        return join_variance(jnp.clip(x0, jnp.asarray(self.low, x0.dtype), jnp.asarray(self.high, x0.dtype)), variance)


def dynamic_threshold_values(x0: Array, ratio: Array, max_value: Array) -> Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3; diffusers ``_threshold_sample``).

    ``s`` = the ``ratio`` quantile (linear interpolation) of ``|x0|`` over the non-batch axes of each
    sample, ``s = clip(s, 1, max_value)``, ``x0 = clip(x0, -s, s) / s``. Where ``s <= 1`` this is the
    static clip to [-1, 1]. The quantile is computed in float32.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.quantile(flat, jnp.asarray(ratio, jnp.float32), axis=1)
    s = jnp.clip(s, 1.0, jnp.asarray(max_value, jnp.float32))
    s = expand_to(s, x0).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


@pytree_dataclass
class DynamicThreshold:
    """Dynamic thresholding of the x0 estimate; see :func:`dynamic_threshold_values`.

    As a denoiser wrapper the noise is re-derived from the thresholded x0; ``samplers.DDIM(threshold=...)``
    keeps the network's noise estimate as diffusers' ``DDIMScheduler(thresholding=True)`` does
    (see :class:`StaticThreshold`).
    """

    inner: Denoiser
    ratio: Array = 0.995
    max_value: Array = math.inf

    def __post_init__(self) -> None:
        as_leaves(self, floats=("ratio", "max_value"))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        x0, variance = split_variance(self.inner(x, sigma, cond), x)
        return join_variance(dynamic_threshold_values(x0, self.ratio, self.max_value), variance)


# ---- conditioning binding --------------------------------------------------------------------

@pytree_dataclass
class Bound:
    """A denoiser with its conditioning fixed: ignores the runner's ``cond`` and passes its own."""

    inner: Denoiser
    cond: Any = None

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        return self.inner(x, sigma, self.cond)


# ---- transforms and composition --------------------------------------------------------------

# Transform, Chain, chain and apply are the algebra shared with jaxdiff.conditioning (network transforms).
Transform, Chain, chain, apply = _transforms.Transform, _transforms.Chain, _transforms.chain, _transforms.apply


def classifier_free(scale: Any, uncond: Any, *, rescale: Any = 0.0, rescale_space: str = "epsilon") -> Transform:
    """Classifier-free guidance transform; see :class:`ClassifierFree`."""
    if rescale_space not in RESCALE_SPACES:
        raise ValueError(f"unknown rescale_space {rescale_space!r}; valid: {', '.join(RESCALE_SPACES)}")
    params = dict(scale=float_leaf(scale), uncond=jax.tree_util.tree_map(jnp.asarray, uncond),
                  rescale=float_leaf(rescale))
    return Transform(ClassifierFree, params, (("rescale_space", rescale_space),))


def classifier_guidance(classifier: Callable[[Array, Array], Array], scale: Any = 1.0, labels: Any = None, *,
                        normalize: bool = True, condition_inner: bool = False) -> Transform:
    """Classifier guidance transform; see :class:`ClassifierGuidance` for who receives ``cond``.

    ``labels=None`` reads the labels from ``cond`` and calls the inner denoiser unconditionally
    (``condition_inner=True``: with the labels too); given ``labels``, ``cond`` goes to the inner denoiser.
    """
    if condition_inner and labels is not None:
        raise ValueError("condition_inner=True passes the labels read from cond to the inner denoiser; with "
                         "labels= given, cond already goes to the inner denoiser: drop one of them")
    params = dict(classifier=as_pytree_callable(classifier), scale=float_leaf(scale),
                  labels=None if labels is None else jnp.asarray(labels, jnp.int32))
    static = (("normalize", bool(normalize)), ("condition_inner", bool(condition_inner)))
    return Transform(ClassifierGuidance, params, static)


def energy_guidance(loss_fn: Callable[[Array, Any], Array], scale: Any = 1.0, *,
                    through_denoiser: bool = True) -> Transform:
    """Loss-gradient guidance transform; see :class:`EnergyGuidance`. A plain function is static (hashed)."""
    params = dict(loss_fn=as_pytree_callable(loss_fn), scale=float_leaf(scale))
    return Transform(EnergyGuidance, params, (("through_denoiser", bool(through_denoiser)),))


def static_threshold(low: Any = -1.0, high: Any = 1.0) -> Transform:
    """Clip x0 to ``[low, high]``; see :class:`StaticThreshold`."""
    try:
        bad = not float(low) < float(high)
    except (TypeError, jax.errors.ConcretizationTypeError):
        bad = False  # traced or per-element bounds: not checked
    if bad:
        raise ValueError(f"static threshold needs low < high, got low={low}, high={high}")
    return Transform(StaticThreshold, dict(low=float_leaf(low), high=float_leaf(high)))


def dynamic_threshold(ratio: Any = 0.995, max_value: Any = math.inf) -> Transform:
    """Imagen's dynamic thresholding; see :func:`dynamic_threshold_values`.

    Defaults follow Imagen (99.5th percentile, no cap); diffusers' schedulers default to
    ``sample_max_value = 1`` (plain clipping), DeepFloyd IF uses ``ratio=0.95, max_value=1.5``.
    """
    try:
        r, m = float(ratio), float(max_value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        r, m = 0.5, 1.0  # traced: not checked
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"dynamic threshold ratio is a quantile in [0, 1], got {r} (e.g. 0.995, not 99.5)")
    if not m >= 1.0:
        raise ValueError(f"dynamic threshold max_value must be >= 1 (s is clipped to [1, max_value]), got {m}")
    return Transform(DynamicThreshold, dict(ratio=float_leaf(ratio), max_value=float_leaf(max_value)))


def bind(cond: Any) -> Transform:
    """Fix the conditioning: the wrapped denoiser ignores the runner's ``cond``; see :class:`Bound`."""
    return Transform(Bound, dict(cond=cond))
