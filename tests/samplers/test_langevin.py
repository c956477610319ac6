"""Annealed Langevin's optional final denoising step (Jolicoeur-Martineau et al. 2021)."""
import jax
import numpy as np

from jaxdiff import mixtures, sampling, schedules
from jaxdiff.samplers import Langevin


def test_final_denoise_is_one_denoiser_call_on_the_last_iterate():
    mix = mixtures.ring_2d()
    sig = schedules.ncsn_geometric(5, 0.1, 8.0, capacity=8)
    x = sampling.initial_noise(jax.random.key(0), (64, 2), 8.0)
    plain = sampling.sample(mix, Langevin(eps=1e-3, n_steps=5, final_denoise=False), sig, x, 1)
    denoised = sampling.sample(mix, Langevin(eps=1e-3, n_steps=5), sig, x, 1)
    assert not np.allclose(plain, denoised)
    np.testing.assert_allclose(denoised, mix(plain, float(sig.values[4])), rtol=1e-4, atol=1e-4)
