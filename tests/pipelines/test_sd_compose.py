"""The pipeline's denoiser is reachable and composable: a user transform runs inside the compiled program."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance
from jaxdiff.denoisers import DiscreteVPDenoiser


def test_user_transform_wraps_the_guided_denoiser(tiny_sd):
    kw = dict(negative="", steps=3, sampler="dpmpp_2m", seed=[1, 2], height=8, width=8, output="latent")
    plain = tiny_sd(["a", "b"], **kw)
    clipped = tiny_sd(["a", "b"], transform=guidance.static_threshold(-0.05, 0.05), **kw)
    # DPM-Solver++ returns the (clipped) x0 estimate on its last step, to sigma = 0
    assert np.abs(clipped).max() <= 0.05 + 1e-6
    assert np.abs(plain).max() > 0.2


def test_denoiser_is_the_unet_in_edm_coordinates(tiny_sd):
    den = tiny_sd.denoiser()
    assert isinstance(den, DiscreteVPDenoiser) and den.prediction == "epsilon"
    ctx = tiny_sd.encode_prompt(["a b"])
    x = jnp.ones((1, 4, 4, 4))
    sigma = float(den.sigmas_train[500])
    eps = tiny_sd.models.unet(x / np.sqrt(1 + sigma**2), jnp.asarray([500.0]), ctx)
    np.testing.assert_allclose(den(x, sigma, {"context": ctx}), x - sigma * eps, rtol=1e-4, atol=1e-4)


def test_throughput_measurement(tiny_sd):
    from benchmarks import throughput

    tiny_sd_square = tiny_sd  # 8x8 default size (unet sample_size 8 x vae factor 2 = 16)
    r = throughput.measure(tiny_sd_square, batch=1, steps=2, repeats=2)
    assert r["images_per_s"] == 1 / r["seconds_per_batch"] > 0
    assert r["first_call_s"] >= min(r["runs_s"]) and r["peak_rss_mb"] > 10
