"""Training objectives in the sigma space of the samplers (pure JAX, no Flax).

Every denoising loss here is a weighted x0 regression through the *same* denoiser adapter the sampler
uses (:mod:`jaxdiff.denoisers`), with ``x = x0 + sigma * noise``::

    loss(sigma) = lambda(sigma) * || D(x, sigma, cond) - x0 ||^2

Choosing the weighting ``lambda`` and the noise-level distribution recovers each paper's objective,
because the adapters are linear in the network output:

=============  =========================  ============================================================
weighting      lambda(sigma)              equals, for the matching adapter
=============  =========================  ============================================================
``epsilon``    1 / sigma^2                ``||eps_hat - eps||^2``; with ``DiscreteVPDenoiser(prediction=
                                          "epsilon")`` and t uniform on the training steps this is Ho et
                                          al. 2020 eq. 14 (``eps_hat`` is the network output); with
                                          ``ContinuousVPDenoiser`` and t ~ U(eps, 1) it is score_sde's VP
                                          denoising score matching (``||std * score + z||^2``).
``v``          (1 + sigma^2) / sigma^2    ``||v_hat - v||^2``, ``v = a eps - s x0`` (Salimans & Ho 2022,
                                          "SNR + 1" weighting); the network output of
                                          ``DiscreteVPDenoiser(prediction="v_prediction")``.
``x0``         1                          ``||x0_hat - x0||^2`` (``prediction="sample"``).
``edm``        (s^2 + sd^2) / (s sd)^2    Karras et al. 2022 eq. 8 with log-normal sigma; equals
                                          ``||F - F_target||^2`` for :class:`EDMDenoiser`'s raw net F.
``ncsn``       1 / (2 sigma^2)            Song & Ermon 2019 eq. 2 with lambda(sigma) = sigma^2:
                                          ``sigma^2 / 2 ||s_hat + (x - x0) / sigma^2||^2``, ``s_hat``
                                          the output of ``VEDenoiser(prediction="score")``.
=============  =========================  ============================================================

``reduce="mean"`` averages the squared error over the non-batch dimensions (the papers' squared
norm divided by the dimension, which keeps learning rates independent of image size);
``reduce="sum"`` gives the papers' squared norm. Losses are per sample, shape (B,), in float32.
Randomness: ``key`` (a PRNG key or an int seed, as in :func:`jaxdiff.sample`) is split once into
(noise-level key, noise key), so a loss is a deterministic function of its key.

Every loss is called in one order, the model first and its conditioning last, as the sampler runner:
``loss(model, x0, key, cond)`` and ``loss.at(model, x0, sigma, noise, cond)``, where ``cond`` is the
denoiser's conditioning for :class:`DenoisingLoss` and the class labels for :class:`NoisyClassifierLoss`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._util import batch_sigma, expand_to
from jaxdiff.denoisers import DiscreteVPClassifier, EDMClassifier  # noqa: F401 (NoisyClassifierLoss's adapters)
from jaxdiff.schedules import vp_sigmas

Array = jax.Array
WEIGHTINGS = ("epsilon", "v", "x0", "edm", "ncsn")
REDUCTIONS = ("mean", "sum")


# ---- noise-level distributions ---------------------------------------------------------------

@pytree_dataclass
class DiscreteVPLevels:
    """t uniform on the training steps {0, ..., T-1}, ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (Ho et al. 2020)."""

    alphas_cumprod: Array

    @property
    def sigmas(self) -> Array:
        return vp_sigmas(jnp.asarray(self.alphas_cumprod, jnp.float32))

    def sample_t(self, key: Array, n: int) -> Array:
        return jax.random.randint(key, (n,), 0, self.sigmas.shape[0])

    def __call__(self, key: Array, n: int) -> Array:
        return self.sigmas[self.sample_t(key, n)]


@pytree_dataclass
class CubicVPLevels(DiscreteVPLevels):
    """t = floor((1 - u^3) T), u ~ U(0, 1): the T2I-Adapter's non-uniform sampling (Mou et al. 2023, Sec. 3.4),
    which favours the early, noisy steps where the layout of the image is decided."""

    def sample_t(self, key: Array, n: int) -> Array:
        steps = self.sigmas.shape[0]
        u = jax.random.uniform(key, (n,), jnp.float32)
        return jnp.clip(jnp.floor((1.0 - u ** 3) * steps).astype(jnp.int32), 0, steps - 1)


@pytree_dataclass
class LogNormalLevels:
    """``ln sigma ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1: P_mean = -1.2, P_std = 1.2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, key: Array, n: int) -> Array:
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (n,), jnp.float32))


@pytree_dataclass
class GeometricLevels:
    """sigma uniform over ``num_levels`` geometric levels from sigma_max to sigma_min (Song & Ermon 2019, Sec. 4.2)."""

    sigma_min: float = 0.01
    sigma_max: float = 1.0
    num_levels: int = static_field(default=10)

    @property
    def levels(self) -> Array:
        r = jnp.linspace(0.0, 1.0, self.num_levels, dtype=jnp.float32)
        lo = jnp.log(jnp.asarray(self.sigma_min, jnp.float32))
        hi = jnp.log(jnp.asarray(self.sigma_max, jnp.float32))
        return jnp.exp(hi + r * (lo - hi))

    def __call__(self, key: Array, n: int) -> Array:
        return self.levels[jax.random.randint(key, (n,), 0, self.num_levels)]


@pytree_dataclass
class ContinuousVPLevels:
    """t ~ U(eps, 1) on the VP SDE with linear beta(t) (Song et al. 2021), as ``sigma(t)``.

    ``sigma(t)^2 = exp(t^2 (beta_max - beta_min) / 2 + t beta_min) - 1`` (the inverse of
    :meth:`jaxdiff.denoisers.ContinuousVPDenoiser.t_of_sigma`); score_sde trains with eps = 1e-5.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-5

    def sigma_of_t(self, t: Array) -> Array:
        return jnp.sqrt(jnp.expm1(0.5 * t * t * (self.beta_max - self.beta_min) + t * self.beta_min))

    def __call__(self, key: Array, n: int) -> Array:
        t = jax.random.uniform(key, (n,), jnp.float32, self.eps, 1.0)
        return self.sigma_of_t(t)


# ---- weightings and the generic denoising loss ----------------------------------------------

def loss_weight(weighting: str, sigma: Array, sigma_data: Any = 0.5) -> Array:
    """``lambda(sigma)`` of the x0-space squared error for each weighting (table in the module doc)."""
    s2 = sigma * sigma
    if weighting == "epsilon":
        return 1.0 / s2
    if weighting == "v":
        return (1.0 + s2) / s2
    if weighting == "x0":
        return jnp.ones_like(sigma)
    if weighting == "edm":
        sd2 = jnp.asarray(sigma_data, sigma.dtype) ** 2
        return (s2 + sd2) / (s2 * sd2)
    if weighting == "ncsn":
        return 0.5 / s2
    raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def as_key(key: Any) -> Array:
    """A PRNG key from a key or an int seed (like :func:`jaxdiff.sample`), with a clear error otherwise."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                              or (dtype == jnp.uint32 and jnp.shape(key) == (2,))):
        return key
    raise TypeError(f"key must be a PRNG key (jax.random.key) or an int seed, got {type(key).__name__} "
                    f"{getattr(key, 'dtype', '')}{tuple(jnp.shape(key))}; losses are called as "
                    "loss(model, x0, key, cond) (classifier losses: loss(classifier, x0, key, labels))")


def _reduce(sq: Array, reduce: str) -> Array:
    axes = tuple(range(1, sq.ndim))
    return jnp.mean(sq, axis=axes) if reduce == "mean" else jnp.sum(sq, axis=axes)


@pytree_dataclass
class DenoisingLoss:
    """``lambda(sigma) ||D(x0 + sigma noise, sigma, cond) - x0||^2`` with sigma from ``levels``.

    Call it as ``loss(denoiser, x0, key, cond) -> (B,)`` (``key`` may be an int seed); :meth:`at` takes
    explicit sigma and noise: ``at(denoiser, x0, sigma, noise, cond)``.
    """

    levels: Callable[[Array, int], Array]
    weighting: str = static_field(default="epsilon")
    sigma_data: float = 0.5
    reduce: str = static_field(default="mean")

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")

    def sample(self, x0: Array, key: Array | int) -> tuple[Array, Array]:
        """The noise levels (B,) and the noise (like x0) that ``__call__`` uses for this key."""
        k_sigma, k_noise = jax.random.split(as_key(key))
        sigma = self.levels(k_sigma, x0.shape[0]).astype(jnp.float32)
        return sigma, jax.random.normal(k_noise, x0.shape, jnp.float32)

    def at(self, denoiser: Callable[..., Array], x0: Array, sigma: Array, noise: Array, cond: Any = None) -> Array:
        """Per-sample loss at given noise levels (B,) and noise."""
        x0 = x0.astype(jnp.float32)
        sigma = batch_sigma(sigma, x0)
        x = x0 + expand_to(sigma, x0) * noise
        err = denoiser(x, sigma, cond).astype(jnp.float32) - x0
        return loss_weight(self.weighting, sigma, self.sigma_data) * _reduce(err * err, self.reduce)

    def __call__(self, denoiser: Callable[..., Array], x0: Array, key: Array | int, cond: Any = None) -> Array:
        sigma, noise = self.sample(x0, key)
        return self.at(denoiser, x0, sigma, noise, cond)


def ddpm_loss(alphas_cumprod: Any, reduce: str = "mean") -> DenoisingLoss:
    """Ho et al. 2020 eq. 14 (L_simple): epsilon regression, t uniform on the training steps."""
    return DenoisingLoss(DiscreteVPLevels(jnp.asarray(alphas_cumprod, jnp.float32)), "epsilon", reduce=reduce)


def cubic_ddpm_loss(alphas_cumprod: Any, reduce: str = "mean") -> DenoisingLoss:
    """Epsilon regression with t drawn by :class:`CubicVPLevels` (the T2I-Adapter's training, Mou et al. 2023)."""
    return DenoisingLoss(CubicVPLevels(jnp.asarray(alphas_cumprod, jnp.float32)), "epsilon", reduce=reduce)


def v_loss(alphas_cumprod: Any, reduce: str = "mean") -> DenoisingLoss:
    """Salimans & Ho 2022: v regression (``lambda = 1 + SNR`` in x0 space), t uniform on the training steps."""
    return DenoisingLoss(DiscreteVPLevels(jnp.asarray(alphas_cumprod, jnp.float32)), "v", reduce=reduce)


def x0_loss(levels: Callable[[Array, int], Array], reduce: str = "mean") -> DenoisingLoss:
    """Unweighted x0 regression under any noise-level distribution."""
    return DenoisingLoss(levels, "x0", reduce=reduce)


def edm_loss(p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5, reduce: str = "mean") -> DenoisingLoss:
    """Karras et al. 2022 eq. 8 with log-normal noise levels and ``lambda = (s^2 + sd^2) / (s sd)^2``."""
    return DenoisingLoss(LogNormalLevels(p_mean, p_std), "edm", sigma_data=sigma_data, reduce=reduce)


def ncsn_loss(sigma_min: float = 0.01, sigma_max: float = 1.0, num_levels: int = 10, reduce: str = "mean") -> DenoisingLoss:
    """Song & Ermon 2019 eqs. 2 and 5: score matching at geometric levels with ``lambda = sigma^2``."""
    return DenoisingLoss(GeometricLevels(sigma_min, sigma_max, num_levels), "ncsn", reduce=reduce)


def vp_continuous_loss(beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5,
                       reduce: str = "mean") -> DenoisingLoss:
    """score_sde's VP denoising score matching (``likelihood_weighting=False``): epsilon loss, t ~ U(eps, 1)."""
    return DenoisingLoss(ContinuousVPLevels(beta_min, beta_max, eps), "epsilon", reduce=reduce)


# ---- noisy classifiers (for classifier guidance) --------------------------------------------

@pytree_dataclass
class NoisyClassifierLoss:
    """Cross-entropy of ``classifier(x0 + sigma noise, sigma) -> logits`` against the labels.

    Called like :class:`DenoisingLoss`, with the labels (B,) as the conditioning:
    ``loss(classifier, x0, key, labels)`` and ``loss.at(classifier, x0, sigma, noise, labels)``.
    The classifier speaks the sigma convention, like a denoiser; wrap a network trained on VP inputs
    with :class:`~jaxdiff.denoisers.DiscreteVPClassifier` (Dhariwal & Nichol 2021, Sec. 4) or
    :class:`~jaxdiff.denoisers.EDMClassifier`.
    """

    levels: Callable[[Array, int], Array]

    def sample(self, x0: Array, key: Array | int) -> tuple[Array, Array]:
        """The noise levels (B,) and the noise (like x0) that ``__call__`` uses for this key."""
        k_sigma, k_noise = jax.random.split(as_key(key))
        sigma = self.levels(k_sigma, x0.shape[0]).astype(jnp.float32)
        return sigma, jax.random.normal(k_noise, x0.shape, jnp.float32)

    def at(self, classifier: Callable[..., Array], x0: Array, sigma: Array, noise: Array, labels: Array) -> Array:
        """Per-sample cross-entropy at given noise levels (B,) and noise."""
        labels = jnp.asarray(labels)
        if labels.shape != (x0.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers of shape (batch,) = ({x0.shape[0]},), got {labels.dtype} "
                             f"{labels.shape}; the loss is called as loss(classifier, x0, key, labels)")
        x0 = x0.astype(jnp.float32)
        sigma = batch_sigma(sigma, x0)
        logits = classifier(x0 + expand_to(sigma, x0) * noise, sigma).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]

    def __call__(self, classifier: Callable[..., Array], x0: Array, key: Array | int, labels: Array) -> Array:
        sigma, noise = self.sample(x0, key)
        return self.at(classifier, x0, sigma, noise, labels)


@pytree_dataclass
class ShiftedCrossEntropy:
    """Cross-entropy of a clean classifier on images shifted by up to ``max_shift`` pixels, the uncovered border
    filled with -1 (the background of images in [-1, 1]): translation-robust judges and style classifiers."""

    max_shift: int = static_field(default=1)

    def __call__(self, classifier: Callable[[Array], Array], x0: Array, key: Array, labels: Array) -> Array:
        m, (b, h, w, _) = self.max_shift, x0.shape
        padded = jnp.pad(x0, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=-1.0)  # -1 is the background
        offsets = jax.random.randint(key, (b, 2), 0, 2 * m + 1)
        crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
        logp = jax.nn.log_softmax(classifier(crop(padded, offsets)), axis=-1)
        return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
