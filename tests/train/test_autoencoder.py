"""The KL autoencoder objective of latent diffusion (Rombach et al. 2022, Sec. 3): closed-form checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.train.autoencoder import AutoencoderObjective, gaussian_kl, psnr_db, reconstruction_error


@pytree_dataclass
class FixedPosterior:
    """encode -> the given (mean, logvar) whatever the image; decode = identity (latents shaped like images)."""

    mean: jax.Array
    logvar: jax.Array
    method: str = "__call__"

    def bind(self, method: str) -> "FixedPosterior":
        return FixedPosterior(self.mean, self.logvar, method)

    def __call__(self, x):
        return (self.mean, self.logvar) if self.method == "encode" else x


def test_gaussian_kl_matches_diffusers_diagonal_gaussian():
    torch = pytest.importorskip("torch")
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    rng = np.random.default_rng(0)
    mean, logvar = rng.standard_normal((3, 4, 4, 2)), rng.standard_normal((3, 4, 4, 2))
    params = torch.tensor(np.concatenate([mean, logvar], -1).transpose(0, 3, 1, 2))  # NCHW [mean, logvar]
    want = vae.DiagonalGaussianDistribution(params).kl().numpy()
    got = gaussian_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_gaussian_kl_is_zero_only_at_the_prior():
    z = jnp.zeros((2, 3))
    np.testing.assert_allclose(np.asarray(gaussian_kl(z, z)), 0.0, atol=1e-7)
    # One unit of mean costs 1/2 nat; a variance of e costs (e - 2) / 2.
    np.testing.assert_allclose(np.asarray(gaussian_kl(jnp.ones((1, 1)), jnp.zeros((1, 1)))), [0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gaussian_kl(jnp.zeros((1, 1)), jnp.ones((1, 1)))), [(np.e - 2) / 2],
                               rtol=1e-6)


@pytest.mark.parametrize("kind,moment", [("l1", lambda s: s * np.sqrt(2 / np.pi)), ("l2", lambda s: s * s)])
def test_posterior_sample_has_the_encoder_std(kind, moment):
    """x = 0 and mean = 0: the reconstruction error is E|s n| = s sqrt(2/pi) (half-normal) or E (s n)^2 = s^2,
    so a draw with the wrong std (exp(logvar) instead of exp(logvar / 2)) fails."""
    s = 0.5
    shape = (64, 16, 16, 3)
    net = FixedPosterior(jnp.zeros(shape), jnp.full(shape, 2 * np.log(s), jnp.float32))
    obj = AutoencoderObjective(kl_weight=0.0, reconstruction=kind)
    loss, aux = obj(net, {"x": jnp.zeros(shape)}, jax.random.PRNGKey(0))
    assert loss.shape == (64,)
    np.testing.assert_allclose(float(jnp.mean(loss)), moment(s), rtol=0.01)


def test_kl_term_is_weighted_per_image_element():
    """With a (near) deterministic posterior at the image: reconstruction 0, loss = w * KL / (H W C)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    logvar = jnp.full(x.shape, -30.0)
    w = 0.01
    loss, aux = AutoencoderObjective(kl_weight=w)(FixedPosterior(x, logvar), {"x": x}, jax.random.PRNGKey(1))
    kl = 0.5 * np.sum(np.asarray(x) ** 2 + np.exp(-30.0) - 1 + 30.0, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(loss), w * kl / (8 * 8 * 3), rtol=1e-4)
    np.testing.assert_allclose(float(aux["kl"]), kl.mean(), rtol=1e-5)


def test_sample_posterior_false_decodes_the_mean():
    x = jnp.ones((2, 4, 4, 1))
    net = FixedPosterior(0.5 * x, jnp.zeros_like(x))  # std 1: sampling would add noise
    loss, aux = AutoencoderObjective(kl_weight=0.0, sample_posterior=False)(net, {"x": x}, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(loss), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(aux["psnr_db"]), 10 * np.log10(4 / 0.25), rtol=1e-5)


def test_reconstruction_error_and_psnr_closed_form():
    a, b = jnp.zeros((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 0.1)
    np.testing.assert_allclose(np.asarray(reconstruction_error(a, b, "l1")), [0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(reconstruction_error(a, b, "l2")), [0.01], rtol=1e-5)
    np.testing.assert_allclose(float(psnr_db(jnp.float32(0.01))), 20.0, rtol=1e-6)
    with pytest.raises(ValueError, match="reconstruction"):
        AutoencoderObjective(reconstruction="l3")
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderObjective(kl_weight=-1.0)


def test_objective_is_not_a_denoiser():
    with pytest.raises(TypeError, match="trainer.model"):
        AutoencoderObjective().denoiser_for(None)
