"""Gaussian mixtures: data distributions whose ideal denoiser, score and class posterior are exact.

For ``p(x0) = sum_k w_k N(mu_k, diag(v_k))``, the noisy marginal at level sigma is
``sum_k w_k N(mu_k, diag(v_k + sigma^2))``; the posterior over components is a softmax of those
log-densities, and ``E[x0 | x, k] = mu_k + v_k / (v_k + sigma^2) (x - mu_k)``. Averaging with the
posterior gives the exact denoiser (Tweedie: ``score = (D - x) / sigma^2``). Components carry
class labels, so class-conditional denoisers and ``log p(y | x, sigma)`` are exact too. Samples may
have any trailing shape; they are flattened to ``d`` features.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._util import batch_sigma

Array = jax.Array
UNCONDITIONAL = -1  # the label meaning "no class": the whole mixture


@pytree_dataclass
class GaussianMixture:
    """A diagonal Gaussian mixture; calling it is the exact denoiser ``D(x, sigma, labels)``.

    ``labels`` (the conditioning) is None or an int array (B,) of class ids, where
    :data:`UNCONDITIONAL` (-1) selects the unconditional mixture for that sample.
    """

    means: Array  # (K, d)
    variances: Array  # (K, d)
    log_weights: Array  # (K,)
    component_classes: Array  # (K,) int
    num_classes: int = static_field(default=1)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _noisy_variances(self, sigma: Array | float, x: Array) -> Array:
        """``v_k + sigma^2``: (K, d) for one level shared by the batch (a scalar sigma, as samplers pass it),
        else (B, K, d) for per-sample levels (B,). The shared case spends no per-sample logs or divisions."""
        s = jnp.asarray(sigma, x.dtype)
        if s.ndim == 0:
            return self.variances + s * s
        return self.variances[None] + (batch_sigma(s, x) ** 2)[:, None, None]

    def _log_resp(self, xf: Array, sigma: Array | float, labels: Any) -> tuple[Array, Array]:
        """Unnormalised log responsibilities (B, K) and the noisy variances, (K, d) or (B, K, d)."""
        var = self._noisy_variances(sigma, xf)
        diff = xf[:, None, :] - self.means[None]
        logpdf = -0.5 * (jnp.sum(diff * diff * (1.0 / var), axis=-1) + jnp.sum(jnp.log(2 * jnp.pi * var), axis=-1))
        return self._prior_logits(labels, xf.shape[0]) + logpdf, var

    def _prior_logits(self, labels: Any, n: int) -> Array:
        """Log weights (n, K), with components outside each sample's class masked to -inf."""
        logits = jnp.broadcast_to(self.log_weights, (n, self.log_weights.shape[0]))
        if labels is None:
            return logits
        labels = jnp.asarray(labels)
        allowed = (labels[:, None] == UNCONDITIONAL) | (self.component_classes[None] == labels[:, None])
        return jnp.where(allowed, logits, -jnp.inf)

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        xf = x.reshape(x.shape[0], -1)
        logits, var = self._log_resp(xf, sigma, cond)
        resp = jax.nn.softmax(logits, axis=-1)
        gain = self.variances / var  # E[x0 | x, k] = mu_k + gain_k (x - mu_k) = gain_k x + (1 - gain_k) mu_k
        if gain.ndim == 2:  # one shared level: two (B, K) x (K, d) products, no (B, K, d) tensor
            x0 = (resp @ gain) * xf + resp @ ((1.0 - gain) * self.means)
        else:
            x0 = jnp.einsum("bk,bkd->bd", resp, gain * xf[:, None, :] + (1.0 - gain) * self.means[None])
        return x0.reshape(x.shape)

    def log_prob(self, x: Array, sigma: Array | float = 0.0, cond: Any = None) -> Array:
        """``log p_sigma(x)`` (optionally of the class-conditional mixture), shape (B,)."""
        xf = x.reshape(x.shape[0], -1)
        logits, _ = self._log_resp(xf, sigma, cond)
        prior = self._prior_logits(cond, xf.shape[0])
        return jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(prior, axis=-1)

    def score(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        """``grad_x log p_sigma(x)`` by Tweedie's formula."""
        s = batch_sigma(sigma, x).reshape((-1,) + (1,) * (x.ndim - 1))
        return (self(x, sigma, cond) - x) / (s * s)

    def class_log_posterior(self, x: Array, sigma: Array) -> Array:
        """``log p(y | x, sigma)`` for every class, shape (B, num_classes)."""
        xf = x.reshape(x.shape[0], -1)
        logits, _ = self._log_resp(xf, sigma, None)
        onehot = jax.nn.one_hot(self.component_classes, self.num_classes, dtype=bool)  # (K, C)
        per_class = jax.nn.logsumexp(jnp.where(onehot[None], logits[:, :, None], -jnp.inf), axis=1)
        return per_class - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def sample(self, key: Array, n: int, labels: Any = None) -> Array:
        """Exact samples (n, d); with ``labels`` (n,) from each sample's class (-1: any)."""
        kc, kn = jax.random.split(key)
        k = jax.random.categorical(kc, self._prior_logits(labels, n), axis=-1)
        z = jax.random.normal(kn, (n, self.dim))
        return self.means[k] + jnp.sqrt(self.variances[k]) * z


@pytree_dataclass
class MixtureClassifier:
    """The exact noisy classifier of a mixture: ``classifier(x, sigma) -> log p(y | x, sigma)``."""

    mixture: GaussianMixture

    def __call__(self, x: Array, sigma: Array) -> Array:
        return self.mixture.class_log_posterior(x, sigma)


def make_mixture(means: Any, stds: Any, weights: Any, classes: Any = None) -> GaussianMixture:
    """Build a mixture from means (K, d), per-component stds (K,) or (K, d), weights (K,), classes (K,)."""
    means = jnp.asarray(means, jnp.float32)
    k, d = means.shape
    stds = jnp.asarray(stds, jnp.float32)
    stds = jnp.broadcast_to(stds.reshape(k, -1) if stds.ndim else stds, (k, d))
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (k,) or np.any(np.asarray(weights) <= 0):
        raise ValueError(f"weights must be {k} positive numbers, got {np.asarray(weights)}")
    classes = jnp.zeros((k,), jnp.int32) if classes is None else jnp.asarray(classes, jnp.int32)
    return GaussianMixture(means, stds * stds, jnp.log(weights / weights.sum()), classes,
                           num_classes=int(np.max(np.asarray(classes))) + 1)


def ring_2d(num_modes: int = 6, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    """A 2-D mixture on a ring with unequal weights; odd and even modes form two classes."""
    angles = np.linspace(0, 2 * np.pi, num_modes, endpoint=False)
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    weights = np.arange(1, num_modes + 1, dtype=np.float64)
    return make_mixture(means, std, weights, np.arange(num_modes) % 2)


def random_mixture(key: Array, num_modes: int, dim: int, num_classes: int = 2, spread: float = 3.0) -> GaussianMixture:
    """A random diagonal mixture in ``dim`` dimensions with unequal weights (for tests and benchmarks)."""
    km, ks, kw = jax.random.split(key, 3)
    means = spread * jax.random.normal(km, (num_modes, dim)) / np.sqrt(max(dim / 2, 1))
    stds = 0.2 + 0.4 * jax.random.uniform(ks, (num_modes, dim))
    weights = 0.5 + jax.random.uniform(kw, (num_modes,))
    return make_mixture(means, stds, weights, np.arange(num_modes) % num_classes)
