"""Training the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

The objective is the VAE bound's two terms without the adversarial and perceptual parts:
``reconstruction(decode(z), x) + kl_weight * KL(q(z | x) || N(0, I))`` with ``z`` drawn from the encoder's
diagonal Gaussian by reparameterisation (Kingma & Welling 2014). Latent diffusion weights the KL term by a
tiny factor (1e-6 in its KL-f8 configuration, both terms summed over elements): the latents stay close to the
encoder mean, barely regularised, and their overall scale is fixed afterwards by ``scaling_factor``. Here both
terms are divided by the number of image elements, which keeps the ratio of latent diffusion while making
learning rates independent of the image size.

The network is an :class:`jaxdiff.models.vae.AutoencoderKL` with ``encode(x) -> (mean, logvar)`` and
``decode(z) -> x``; batches are ``{"x": images (B, H, W, C) in [-1, 1]}``. It trains through the ordinary
:class:`jaxdiff.train.Trainer` and :func:`jaxdiff.train.fit`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field

Array = jax.Array
RECONSTRUCTIONS = ("l1", "l2")


def gaussian_kl(mean: Array, logvar: Array) -> Array:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` per sample, summed over the non-batch axes (Kingma & Welling
    2014, App. B): ``0.5 * sum(mean^2 + var - 1 - logvar)`` (diffusers' ``DiagonalGaussianDistribution.kl``)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    terms = mean * mean + jnp.exp(logvar) - 1.0 - logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


def reconstruction_error(x_hat: Array, x: Array, kind: str = "l1") -> Array:
    """Per-sample mean absolute (``"l1"``, latent diffusion's choice) or squared (``"l2"``) error."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction loss {kind!r}; valid: {', '.join(RECONSTRUCTIONS)}")
    d = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    err = jnp.abs(d) if kind == "l1" else d * d
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def posterior_sample(mean: Array, logvar: Array, key: Array) -> Array:
    """``mean + exp(logvar / 2) * noise``: a reparameterised draw from the encoder's diagonal Gaussian."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise


@pytree_dataclass
class AutoencoderObjective:
    """``reconstruction(decode(z), x) + kl_weight * KL / (elements of x)``, ``z ~ q(z | x)``, per sample.

    ``kl_weight`` is a traced leaf (changing it never recompiles); ``reconstruction`` is ``"l1"`` or ``"l2"``.
    ``sample_posterior=False`` decodes the mean (a plain autoencoder plus the KL penalty).
    The aux metrics are the batch's reconstruction error, KL (per sample, summed) and PSNR of the
    reconstruction for images in [-1, 1].
    """

    kl_weight: float = 1e-6
    reconstruction: str = static_field(default="l1")
    sample_posterior: bool = static_field(default=True)

    needs_labels = False

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction loss {self.reconstruction!r}; "
                             f"valid: {', '.join(RECONSTRUCTIONS)}")
        if isinstance(self.kl_weight, (int, float)) and self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    def denoiser_for(self, net: Any) -> Any:
        raise TypeError("an autoencoder run trains a VAE, not a denoiser: use trainer.model(state)")

    def __call__(self, net: Any, batch: dict, key: Array) -> tuple[Array, dict]:
        if not hasattr(net, "bind"):
            raise TypeError("AutoencoderObjective needs the network's encode/decode methods: train in float32 "
                            "(drop compute_dtype=)")
        x = batch["x"]
        mean, logvar = net.bind("encode")(x)
        z = posterior_sample(mean, logvar, key) if self.sample_posterior else mean.astype(jnp.float32)
        x_hat = net.bind("decode")(z)
        rec = reconstruction_error(x_hat, x, self.reconstruction)
        kl = gaussian_kl(mean, logvar)
        n = x[0].size
        mse = jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x), axis=tuple(range(1, x.ndim)))
        aux = {"reconstruction": jnp.mean(rec), "kl": jnp.mean(kl),
               "psnr_db": jnp.mean(psnr_db(mse, peak_to_peak=2.0))}
        return rec + self.kl_weight * kl / n, aux


def psnr_db(mse: Array, peak_to_peak: float = 1.0) -> Array:
    """Peak signal-to-noise ratio ``10 log10(peak^2 / mse)`` in dB (2.0 for images in [-1, 1])."""
    return 10.0 * jnp.log10(peak_to_peak ** 2 / jnp.maximum(mse, 1e-12))
