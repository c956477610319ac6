"""``samplers.Resample`` (self-recurrence / RePaint resampling): the pass structure and its bad input.

Its distribution is checked on exact Gaussian-mixture targets in ``test_exact_targets.py``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import mixtures, sampling, schedules
from jaxdiff.samplers import DPMSolverPP2M, Euler, EulerAncestral, Resample

MIX = mixtures.random_mixture(jax.random.key(1), 3, 4)
SIGMAS = schedules.karras(12, 0.01, 20.0, capacity=16)


def _sample(sampler, key: int = 3) -> np.ndarray:
    x = sampling.initial_noise(jax.random.key(2), (64, 4), SIGMAS.values[0])
    return np.asarray(sampling.sample(MIX, sampler, SIGMAS, x, jax.random.key(key)))


@pytest.mark.parametrize("inner", [Euler(), EulerAncestral(), DPMSolverPP2M()], ids=["euler", "ancestral", "dpmpp_2m"])
def test_one_repeat_is_the_inner_sampler(inner) -> None:
    # the same arithmetic in two compiled programs: equal to float32 rounding (XLA may fuse the two differently)
    np.testing.assert_allclose(_sample(Resample(inner, 1)), _sample(inner), rtol=1e-6, atol=1e-6)


def test_two_passes_renoise_to_the_starting_level() -> None:
    """One Euler move taken twice: step, lift back by sqrt(sigma^2 - sigma_next^2) noise, step again."""
    den = lambda x, s: MIX(x, s)  # noqa: E731
    x = jax.random.normal(jax.random.key(4), (8, 4)) * 5.0
    sigma, sigma_next, key = jnp.float32(5.0), jnp.float32(3.0), jax.random.key(7)
    got, _ = Resample(Euler(), 2).step(den, (), x, sigma, sigma_next, key)
    euler = lambda x: x + (sigma_next - sigma) * (x - den(x, sigma)) / sigma  # noqa: E731
    z = jax.random.normal(jax.random.fold_in(key, 2), x.shape)
    want = euler(euler(x) + 4.0 * z)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # without the lift (or with a different one) the two passes would land elsewhere
    assert np.abs(np.asarray(got) - np.asarray(euler(euler(x)))).max() > 1.0


def test_more_repeats_change_the_sample_without_recompiling() -> None:
    a = _sample(Resample(Euler(), 2))
    programs = sampling.sample_jit._cache_size()
    b = _sample(Resample(Euler(), 3))
    assert sampling.sample_jit._cache_size() == programs
    assert np.abs(a - b).max() > 1e-3
    assert np.all(np.isfinite(b))


@pytest.mark.parametrize("repeats", [0, -1, 1.5])
def test_bad_repeats_are_refused(repeats) -> None:
    with pytest.raises(ValueError, match="repeats"):
        Resample(Euler(), repeats)
