"""Exact Gaussian-mixture denoisers, densities and class posteriors against float64 numpy re-derivations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import mixtures


def np_log_components(mix, x, sigma):
    """log w_k + log N(x; mu_k, diag(v_k + sigma^2)) per sample and component, float64 (B, K)."""
    mu = np.asarray(mix.means, np.float64)
    tot = np.asarray(mix.variances, np.float64) + sigma**2
    xf = np.asarray(x, np.float64).reshape(x.shape[0], 1, -1)
    logpdf = -0.5 * np.sum((xf - mu) ** 2 / tot + np.log(2 * np.pi * tot), axis=-1)
    return np.asarray(mix.log_weights, np.float64) + logpdf


def np_logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


@pytest.fixture(scope="module")
def mix():
    return mixtures.random_mixture(jax.random.key(0), num_modes=5, dim=6, num_classes=3)


@pytest.fixture(scope="module")
def x():
    return 1.5 * jax.random.normal(jax.random.key(1), (8, 2, 3))


@pytest.mark.parametrize("sigma", [0.02, 0.5, 3.0])
def test_denoiser_and_class_conditionals_match_numpy(mix, x, sigma):
    labels = np.array([0, 1, 2, -1, 0, 1, 2, -1])
    logc = np_log_components(mix, x, sigma)
    classes = np.asarray(mix.component_classes)
    mu, var = np.asarray(mix.means, np.float64), np.asarray(mix.variances, np.float64)
    xf = np.asarray(x, np.float64).reshape(8, 1, -1)
    x0_k = mu + var / (var + sigma**2) * (xf - mu)
    for lab in (None, labels):
        keep = np.ones((8, 5), bool) if lab is None else (lab[:, None] < 0) | (classes[None] == lab[:, None])
        lw = np.where(keep, logc, -np.inf)
        r = np.exp(lw - lw.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        want = np.einsum("bk,bkd->bd", r, x0_k).reshape(x.shape)
        cond = None if lab is None else jnp.asarray(lab)
        np.testing.assert_allclose(mix(x, sigma, cond), want, atol=2e-5 * max(1.0, np.abs(want).max()))
        # the class-conditional density is the mixture of that class's components, renormalised
        prior = np.where(keep, np.asarray(mix.log_weights, np.float64)[None], -np.inf)
        want_lp = np_logsumexp(lw, 1) - np_logsumexp(prior, 1)
        np.testing.assert_allclose(mix.log_prob(x, sigma, cond), want_lp, rtol=1e-5, atol=1e-4)


def test_per_sample_levels_equal_each_samples_own_level(mix, x):
    """A vector of levels (B,) takes the per-sample path; each row equals the shared-level path (checked against numpy
    above) at that row's level, for the denoiser, the density and the class posterior."""
    sigmas = jnp.array([0.02, 0.3, 0.5, 1.0, 3.0, 0.1, 2.0, 0.7])
    labels = jnp.array([0, 1, 2, -1, 0, 1, 2, -1])
    den, lp = mix(x, sigmas, labels), mix.log_prob(x, sigmas, labels)
    post = mixtures.MixtureClassifier(mix)(x, sigmas)
    for i, s in enumerate(np.asarray(sigmas)):
        row, lab = x[i: i + 1], labels[i: i + 1]
        np.testing.assert_allclose(den[i: i + 1], mix(row, float(s), lab), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lp[i: i + 1], mix.log_prob(row, float(s), lab), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(post[i: i + 1], mixtures.MixtureClassifier(mix)(row, float(s)), atol=1e-4)


@pytest.mark.parametrize("sigma", [0.05, 1.0])
def test_class_posterior_is_bayes_rule(mix, x, sigma):
    logc = np_log_components(mix, x, sigma)
    classes = np.asarray(mix.component_classes)
    want = np.stack([np_logsumexp(np.where(classes == c, logc, -np.inf), 1) for c in range(3)], 1)
    want -= np_logsumexp(logc, 1)[:, None]
    got = mixtures.MixtureClassifier(mix)(x, sigma)
    assert got.shape == (8, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.exp(np.asarray(got)).sum(axis=1), 1.0, atol=1e-5)


def test_score_is_the_gradient_of_the_log_density(mix, x):
    """Tweedie's (D - x) / sigma^2 against autodiff of log p_sigma, unconditional and per class."""
    labels = jnp.array([0, 1, 2, -1, 0, 1, 2, -1])
    for cond in (None, labels):
        grad = jax.grad(lambda x_: jnp.sum(mix.log_prob(x_, 0.7, cond)))(x)
        np.testing.assert_allclose(mix.score(x, 0.7, cond), grad, rtol=1e-4, atol=1e-4)


def test_samples_have_the_mixture_moments():
    mix = mixtures.make_mixture([[-2.0, 0.0], [3.0, 1.0]], [[0.5, 1.0], [1.0, 0.2]], [1.0, 3.0], [0, 1])
    n = 40000
    s = np.asarray(mix.sample(jax.random.key(2), n))
    w = np.array([0.25, 0.75])
    mu = np.array([[-2.0, 0.0], [3.0, 1.0]])
    mean = w @ mu
    var = w @ (np.array([[0.25, 1.0], [1.0, 0.04]]) + mu**2) - mean**2
    np.testing.assert_allclose(s.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(s.var(0), var, rtol=0.03)
    only_0 = np.asarray(mix.sample(jax.random.key(3), 2000, jnp.zeros((2000,), jnp.int32)))
    np.testing.assert_allclose(only_0.mean(0), [-2.0, 0.0], atol=0.08)


def test_ring_and_constructor_checks():
    ring = mixtures.ring_2d(num_modes=6, radius=4.0, std=0.3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ring.means), axis=1), 4.0, rtol=1e-6)
    np.testing.assert_array_equal(ring.component_classes, [0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(np.exp(np.asarray(ring.log_weights)), np.arange(1, 7) / 21, rtol=1e-6)
    assert ring.num_classes == 2
    with pytest.raises(ValueError, match="positive"):
        mixtures.make_mixture([[0.0], [1.0]], 1.0, [1.0, -1.0])
