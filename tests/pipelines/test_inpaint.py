"""Inpainting by mask blending (any model): the kept region ends exactly at the init image's latents."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.pipelines.stable_diffusion import POSTERIOR_STREAM


def test_mask_blend_keeps_the_known_region(tiny_sd):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    mask = np.zeros((2, 8, 8), np.float32)
    mask[:, :, 4:] = 1.0  # repaint the right half
    seeds = [5, 6]
    kw = dict(negative="", steps=4, sampler="dpmpp_2m", seed=seeds, guidance=3.0, image=image, mask=mask,
              output="latent")
    lat = tiny_sd(["a", "b"], **kw)
    mean, std = tiny_sd.models.encode_image(jnp.asarray(image * 2 - 1))
    eps = tiny_sd.initial_noise(seeds, 2, 8, 8, stream=POSTERIOR_STREAM)
    known = np.asarray(tiny_sd.models.to_latent(mean + std * eps))
    np.testing.assert_allclose(lat[:, :, :2], known[:, :, :2], atol=1e-5)  # latent columns 0-1 = image columns 0-3
    assert np.abs(lat[:, :, 2:] - known[:, :, 2:]).min() > 1e-4  # the masked half was generated
    # a different prompt changes only the repainted half
    other = tiny_sd(["e e", "d"], **kw)
    np.testing.assert_allclose(other[:, :, :2], lat[:, :, :2], atol=1e-5)
    assert np.abs(other[:, :, 2:] - lat[:, :, 2:]).max() > 1e-3
