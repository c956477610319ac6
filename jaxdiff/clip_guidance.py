"""CLIP guidance with a noise-aware CLIP (GLIDE, Nichol et al. 2022, Sec. 2.4, eq. 4) as a denoiser transform.

GLIDE shifts the reverse-process mean by the gradient of the dot product of a noised image's CLIP embedding
``f(x_t, t)`` with the caption's ``g(c)``::

    mu'(x_t) = mu(x_t) + s * Sigma(x_t) * grad_{x_t} (f(x_t, t) . g(c))

(the classifier-guidance form of Dhariwal & Nichol 2021, Alg. 1, with ``log p(c | x_t)`` replaced by the
CLIP score). :class:`CLIPGuidance` takes *any* image-embedding function ``image_embed(x, sigma) -> (B, D)``
of jaxdiff's EDM coordinates (``x = x0 + sigma * noise``; wrap a VP network with
:class:`~jaxdiff.denoisers.DiscreteVPClassifier`, which feeds it ``x / sqrt(1 + sigma^2)`` and the step t)
and a text embedding ``text_embed`` (D,) or (B, D), and returns a denoiser:

- ``schedule=None`` (any sampler): the score form. Writing the CLIP score as a log-likelihood, Tweedie gives
  ``D' = D + s sigma^2 grad_x (f . g)``; with an ancestral sampler this moves the mean by ``s Sigma grad`` to
  first order in the step (as :class:`jaxdiff.guidance.ClassifierGuidance`).
- ``schedule=`` the sampling :class:`~jaxdiff.schedules.Sigmas` of :class:`~jaxdiff.samplers.DDPM`: the
  exact eq. 4 for that step. The step from ``sigma`` to the next level ``sigma'`` has VE mean
  ``x0 + (sigma'/sigma)^2 (x - x0)``, so shifting ``x0`` by ``dmu / (1 - sigma'^2 / sigma^2)`` shifts the
  mean by ``dmu = Sigma_ve sqrt((1 + sigma^2) / (1 + sigma'^2)) grad_x (f . g)`` (``Sigma_ve = (1 + sigma'^2)
  Sigma_vp``; ``grad_{x_vp} = sqrt(1 + sigma^2) grad_x``). ``variance`` is the sampler's: ``fixed_small``
  (beta tilde), ``fixed_large`` (beta) or ``learned_range`` (the inner denoiser returns the network's raw
  variance values as channels ``C..2C-1``, and ``Sigma = exp(v' log beta + (1 - v') log beta_tilde)`` with
  ``v' = (v + 1) / 2``, Nichol & Dhariwal 2021 eq. 15; those channels pass through unchanged).

``scale``, ``text_embed`` and the schedule are traced leaves: changing them compiles nothing new. On the last
step (``sigma' = 0``) beta tilde is 0 and is floored at 1e-20 as diffusers' schedulers do, where openai's code
uses the next step's posterior variance, so the two differ there (no noise is added on that step either way).
GLIDE's own CLIP score carries ``exp(logit_scale) = 100``: with unit-norm embeddings put it into ``scale``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform, as_pytree_callable, float_leaf
from jaxdiff._util import as_leaves, batch_sigma, expand_to

Array = jax.Array
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOG_FLOOR = 1e-20


def clip_score(image_embed: Callable[[Array, Array], Array], x: Array, sigma: Array, text: Array) -> Array:
    """``sum_b f(x_b, sigma_b) . g_b``: the noised images' embeddings dotted with the text embedding(s)."""
    emb = image_embed(x, sigma)
    if emb.ndim != 2 or emb.shape[0] != x.shape[0]:
        raise ValueError(f"image_embed must return (batch, dim) = ({x.shape[0]}, D) embeddings, got shape {emb.shape}")
    text = jnp.asarray(text, emb.dtype)
    if text.shape not in ((emb.shape[1],), emb.shape):
        raise ValueError(f"text_embed must be ({emb.shape[1]},) or {tuple(emb.shape)} to match the image embeddings, "
                         f"got {text.shape}")
    return jnp.sum(emb * text)


def next_level(sigmas: Any, sigma: Array) -> Array:
    """The level after ``sigma`` in a schedule (the entry following the nearest one), per sample."""
    values = jnp.asarray(sigmas.values, sigma.dtype)
    i = jnp.argmin(jnp.abs(values[None, :] - sigma[:, None]), axis=1)
    return values[jnp.minimum(i + 1, values.shape[0] - 1)]


def vp_step_variance(sigma: Array, sigma_next: Array, variance: str, frac: Array | None = None) -> Array:
    """The DDPM step's variance in VP coordinates: ``beta = 1 - abar_t / abar_prev`` (fixed_large), the posterior
    ``beta_tilde = beta (1 - abar_prev) / (1 - abar_t)`` (fixed_small), or their log-interpolation by ``frac``."""
    s2, n2 = sigma * sigma, sigma_next * sigma_next
    beta = (s2 - n2) / (1.0 + s2)
    beta_tilde = beta * n2 * (1.0 + s2) / (jnp.maximum(s2, LOG_FLOOR) * (1.0 + n2))
    if variance == "fixed_large":
        return beta
    if variance == "fixed_small":
        return beta_tilde
    log_b, log_bt = jnp.log(jnp.maximum(beta, LOG_FLOOR)), jnp.log(jnp.maximum(beta_tilde, LOG_FLOOR))
    return jnp.exp(frac * log_b + (1.0 - frac) * log_bt)


@pytree_dataclass
class CLIPGuidance:
    """GLIDE's CLIP guidance of ``inner`` toward ``text_embed`` with scale ``scale``; see the module docstring."""

    inner: Callable[..., Array]
    image_embed: Callable[[Array, Array], Array]
    text_embed: Array
    scale: Array
    schedule: Any = None
    variance: str = static_field(default="fixed_small")

    def __post_init__(self) -> None:
        as_leaves(self, floats=("scale",))
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; valid: {', '.join(VARIANCES)}")

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        out = self.inner(x, sigma, cond)
        learned = self.variance == "learned_range"
        c = x.shape[-1]
        if learned and out.shape[-1] != 2 * c:
            raise ValueError(f"variance='learned_range' needs a denoiser returning 2 x {c} channels (x0 estimate and "
                             f"the network's variance values), got {out.shape[-1]}")
        grad = jax.grad(clip_score, argnums=1)(self.image_embed, x, sigma, self.text_embed).astype(x.dtype)
        scale = expand_to(self.scale, x)
        x0, rest = (out[..., :c], out[..., c:]) if learned else (out, None)
        s = expand_to(sigma, x)
        if self.schedule is None:
            shift = scale * s * s * grad
        else:
            n = expand_to(next_level(self.schedule, sigma), x)
            frac = (rest.astype(x.dtype) + 1.0) / 2.0 if learned else None
            var_vp = vp_step_variance(s, n, self.variance, frac)
            dmu = scale * var_vp * (1.0 + n * n) * jnp.sqrt((1.0 + s * s) / (1.0 + n * n)) * grad
            shift = dmu / jnp.maximum(1.0 - (n * n) / (s * s), LOG_FLOOR)
        x0 = x0 + shift.astype(x0.dtype)
        return x0 if rest is None else jnp.concatenate([x0, rest], axis=-1)


def clip_guidance(image_embed: Callable[[Array, Array], Array], text_embed: Any, scale: Any = 1.0, *,
                  schedule: Any = None, variance: str = "fixed_small") -> Transform:
    """CLIP-guidance transform (:class:`CLIPGuidance`) for :func:`jaxdiff.guidance.apply` / ``chain``."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    params = dict(image_embed=as_pytree_callable(image_embed), text_embed=jnp.asarray(text_embed),
                  scale=float_leaf(scale), schedule=schedule)
    return Transform(CLIPGuidance, params, (("variance", variance),))


@pytree_dataclass
class NormalizedEmbedding:
    """``inner(x, sigma) / |inner(x, sigma)|``: CLIP's unit-norm image features from any embedding network."""

    inner: Callable[[Array, Array], Array]

    def __call__(self, x: Array, sigma: Array) -> Array:
        e = self.inner(x, sigma)
        return e * jax.lax.rsqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)
