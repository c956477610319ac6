"""CLIP guidance (GLIDE eq. 4) against closed forms: a linear "CLIP" of the VP input has a constant gradient, so
the guided DDPM mean must move by exactly ``s Sigma A^T g`` in VP coordinates, with Sigma from the schedule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance as G
from jaxdiff import schedules
from jaxdiff.clip_guidance import clip_guidance
from jaxdiff.samplers import DDPM

D, SHAPE = 3, (2, 4, 4, 1)
RNG = np.random.default_rng(0)
A = jnp.asarray(RNG.standard_normal((D, 16)), jnp.float32)
TEXT = jnp.asarray(RNG.standard_normal(D), jnp.float32)
GRAD_VP = np.asarray(A.T @ TEXT).reshape(1, 4, 4, 1)  # grad_{x_vp} of (A x_vp) . g


def linear_clip(x, sigma):
    """f(x_vp) = A x_vp with x_vp = x / sqrt(1 + sigma^2): GLIDE's CLIP sees the VP input."""
    x_vp = x / jnp.sqrt(1.0 + sigma**2)[:, None, None, None]
    return x_vp.reshape(x.shape[0], -1) @ A.T


def gaussian_denoiser(x, sigma, cond=None):
    """The ideal denoiser of N(0, I) data."""
    return x / (1.0 + sigma**2)[:, None, None, None]


ABAR = np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
SIGMAS = schedules.vp_discrete(10, ABAR.astype(np.float32), "leading")


def _vp_truth(sigma, sigma_next, variance, frac=None):
    """Sigma of the DDPM step in VP coordinates, from abar_t and abar_prev (Ho et al. 2020 eqs. 6-7)."""
    a_t, a_p = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    beta = 1.0 - a_t / a_p
    beta_tilde = beta * (1.0 - a_p) / (1.0 - a_t)
    c1 = beta * np.sqrt(a_p) / (1.0 - a_t)   # posterior mean coefficient of x0
    if variance == "fixed_large":
        return beta, c1
    if variance == "fixed_small":
        return beta_tilde, c1
    return np.exp(frac * np.log(beta) + (1.0 - frac) * np.log(beta_tilde)), c1


@jax.jit
def _step_difference(transform, sampler, x, sigma, sigma_next, key):
    """A DDPM step of the guided denoiser minus the unguided one, with the same noise."""
    guided = G.apply(gaussian_denoiser, transform)
    out_g, _ = sampler.step(lambda x_, s_: guided(x_, s_), (), x, sigma, sigma_next, key)
    out_u, _ = sampler.step(lambda x_, s_: gaussian_denoiser(x_, jnp.broadcast_to(s_, (2,))), (), x, sigma,
                            sigma_next, key)
    return out_g - out_u


@pytest.mark.parametrize("variance", ["fixed_small"])
def test_ddpm_mean_moves_by_scale_sigma_grad(variance):
    """One DDPM step, guided minus unguided (same noise): the VE mean difference is
    ``s Sigma A^T g / sqrt(abar_prev)``."""
    scale, i = 2.5, 4
    sigma, sigma_next = float(SIGMAS.values[i]), float(SIGMAS.values[i + 1])
    x = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE), jnp.float32) * 3.0
    diff = _step_difference(clip_guidance(linear_clip, TEXT, scale, schedule=SIGMAS, variance=variance),
                            DDPM(variance=variance), x, jnp.float32(sigma), jnp.float32(sigma_next), jax.random.key(0))
    var, _ = _vp_truth(sigma, sigma_next, variance)
    expected = scale * var * GRAD_VP * np.sqrt(1.0 + sigma_next**2)
    np.testing.assert_allclose(np.asarray(diff), np.broadcast_to(expected, SHAPE), rtol=2e-4, atol=1e-6)


def test_learned_range_mean_shift_and_variance_channels():
    """With learned variance the x0 shift times the posterior coefficient c1 is ``s Sigma(v) A^T g`` (VP), Sigma
    interpolated by the network's values v (v = 1: beta, v = -1: beta tilde), which pass through unchanged."""
    scale, i = 1.5, 6
    sigma, sigma_next = float(SIGMAS.values[i]), float(SIGMAS.values[i + 1])
    v = np.random.default_rng(2).uniform(-1, 1, SHAPE).astype(np.float32)
    v[0, 0, :, 0], v[0, 1, :, 0] = 1.0, -1.0  # the ends of the range: beta (fixed_large) and beta_tilde (fixed_small)
    v = jnp.asarray(v)
    inner = lambda x, s, c=None: jnp.concatenate([gaussian_denoiser(x, jnp.broadcast_to(s, (2,))), v], -1)  # noqa: E731
    guided = G.apply(inner, clip_guidance(linear_clip, TEXT, scale, schedule=SIGMAS, variance="learned_range"))
    x = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE), jnp.float32)
    s = jnp.full((2,), sigma, jnp.float32)
    out, ref = jax.jit(lambda x_, s_: (guided(x_, s_), inner(x_, s_)))(x, s)
    np.testing.assert_array_equal(np.asarray(out[..., 1:]), np.asarray(v))
    var, c1 = _vp_truth(sigma, sigma_next, "learned_range", (np.asarray(v) + 1) / 2)
    np.testing.assert_allclose(var[0, 0], _vp_truth(sigma, sigma_next, "fixed_large")[0], rtol=1e-6)
    np.testing.assert_allclose(var[0, 1], _vp_truth(sigma, sigma_next, "fixed_small")[0], rtol=1e-6)
    np.testing.assert_allclose(c1 * np.asarray(out[..., :1] - ref[..., :1]), scale * var * GRAD_VP, rtol=2e-4,
                               atol=1e-7)
    # through DDPM(variance="learned_range") (the learned-variance sampler): the step's mean moves by s Sigma(v) g
    key, sampler = jax.random.key(1), DDPM(variance="learned_range")

    @jax.jit
    def diff(x, sig, nxt):
        out_g, _ = sampler.step(lambda x_, s_: guided(x_, s_), (), x, sig, nxt, key)
        out_u, _ = sampler.step(lambda x_, s_: inner(x_, s_), (), x, sig, nxt, key)
        return out_g - out_u

    expected = scale * var * GRAD_VP * np.sqrt(1.0 + sigma_next**2)
    np.testing.assert_allclose(np.asarray(diff(x, jnp.float32(sigma), jnp.float32(sigma_next))), expected,
                               rtol=2e-4, atol=1e-6)
    with pytest.raises(ValueError, match="2 x 1 channels"):
        G.apply(gaussian_denoiser, clip_guidance(linear_clip, TEXT, schedule=SIGMAS, variance="learned_range"))(x, s)


def test_score_form_and_text_changes_do_not_recompile():
    """Without a schedule: ``D' = D + s sigma^2 grad_x (f . g)``, with ``grad_x = A^T g / sqrt(1 + sigma^2)``; the
    scale and the text embedding are traced (one compile for several)."""
    traces = []

    @jax.jit
    def run(transform, x, s):
        traces.append(1)
        return G.apply(gaussian_denoiser, transform)(x, s)

    x = jnp.asarray(np.random.default_rng(4).standard_normal(SHAPE), jnp.float32)
    s = jnp.asarray([0.5, 3.0], jnp.float32)
    for scale, text in ((1.0, TEXT), (4.0, -2.0 * TEXT)):
        out = run(clip_guidance(linear_clip, text, scale), x, s)
        grad = np.asarray(A.T @ text).reshape(1, 4, 4, 1) / np.sqrt(1 + np.asarray(s) ** 2)[:, None, None, None]
        expected = np.asarray(gaussian_denoiser(x, s)) + scale * np.asarray(s)[:, None, None, None] ** 2 * grad
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="text_embed"):
        G.apply(gaussian_denoiser, clip_guidance(linear_clip, jnp.ones(D + 1)))(x, s)
