"""One compiled sampling program serves every runtime value; only shapes (the capacity) recompile."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance as G
from jaxdiff import mixtures, sampling, samplers, schedules

# unusual sizes, so no other test in the session has compiled this exact signature
BATCH, CAPACITY = 7, 13


def _run(mix, steps, scale, phi, eta, seed, labels, uncond, capacity=CAPACITY):
    den = G.apply(mix, G.classifier_free(scale, uncond, rescale=phi))
    sig = schedules.karras(steps, 0.01, 20.0, capacity=capacity)
    x = sampling.initial_noise(jax.random.key(seed), (BATCH, 2), 20.0)
    return np.asarray(sampling.sample(den, samplers.DDIM(eta=eta), sig, x, seed, labels))


def test_one_compilation_serves_steps_scales_eta_seeds_and_labels():
    mix = mixtures.ring_2d()
    ones, zeros = jnp.ones((BATCH,), jnp.int32), jnp.zeros((BATCH,), jnp.int32)
    minus = jnp.full((BATCH,), -1, jnp.int32)
    runs = [  # steps, scale, phi, eta, seed, labels, uncond (negative conditioning)
        (5, 1.0, 0.0, 0.0, 0, ones, minus),
        (13, 1.0, 0.0, 0.0, 0, ones, minus),  # step count up to the capacity
        (5, 4.0, 0.0, 0.0, 0, ones, minus),  # guidance scale
        (5, 4.0, 0.7, 0.0, 0, ones, minus),  # guidance rescale
        (5, 4.0, 0.7, 1.0, 0, ones, minus),  # eta
        (5, 4.0, 0.7, 1.0, 3, ones, minus),  # seed
        (5, 4.0, 0.7, 1.0, 3, zeros, minus),  # labels
        (5, 4.0, 0.7, 1.0, 3, zeros, ones),  # a negative label instead of the unconditional one
    ]
    sampling.sample_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = sampling.sample_jit._cache_size()
    outs = [_run(mix, *r) for r in runs]
    assert sampling.sample_jit._cache_size() - before == 1
    for i in range(1, len(outs)):  # every change took effect
        assert np.abs(outs[i] - outs[i - 1]).max() > 1e-3, runs[i]

    # a new capacity is a new shape: it compiles once more (the counter does count)
    _run(mix, 5, 1.0, 0.0, 0.0, 0, ones, minus, capacity=CAPACITY + 4)
    assert sampling.sample_jit._cache_size() - before == 2
    _run(mix, 9, 2.0, 0.0, 0.5, 1, zeros, minus, capacity=CAPACITY + 4)
    assert sampling.sample_jit._cache_size() - before == 2


def test_steps_beyond_capacity_are_refused():
    mix = mixtures.ring_2d()
    with pytest.raises(ValueError, match="capacity"):
        _run(mix, CAPACITY + 1, 1.0, 0.0, 0.0, 0, jnp.ones((BATCH,), jnp.int32), jnp.array([-1]))


def _numeric_variants(factory) -> list[dict]:
    """Each numeric option of a sampler at its default, given as a Python float, an int (or NumPy
    float64 where the default is not whole) and a 0-d NumPy array: three spellings of one setting."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(factory) if not f.metadata.get("static")
                and isinstance(f.default, (int, float)) and not isinstance(f.default, bool)}
    as_int = {k: int(v) if float(v).is_integer() else np.float64(v) for k, v in defaults.items()
              if np.isfinite(v)}
    return [{k: float(v) for k, v in defaults.items()}, as_int, {k: np.asarray(v) for k, v in defaults.items()}]


WITH_OPTIONS = [n for n in sorted(samplers.SAMPLERS) if _numeric_variants(samplers.SAMPLERS[n])[0]]


def test_most_samplers_have_numeric_options():
    assert len(WITH_OPTIONS) >= 7  # eta, churn, SNR, tolerances...: the next test covers them


@pytest.mark.parametrize("name", WITH_OPTIONS)
def test_int_and_float_sampler_options_share_one_program(name):
    """``DDIM(eta=0)``, ``DDIM(eta=0.0)`` and ``DDIM(eta=np.asarray(0.0))`` compile one program."""
    factory = samplers.SAMPLERS[name]
    variants = _numeric_variants(factory)
    mix = mixtures.ring_2d()
    sig = schedules.karras(3, 0.1, 5.0, capacity=11)  # a capacity no other test uses
    x = sampling.initial_noise(jax.random.key(0), (BATCH, 2), 5.0)
    sampling.sample_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = sampling.sample_jit._cache_size()
    outs = [np.asarray(sampling.sample(mix, factory(**v), sig, x, 0, check_finite=False)) for v in variants]
    assert sampling.sample_jit._cache_size() - before == 1, variants
    np.testing.assert_array_equal(outs[0], outs[2])


def test_sampler_options_are_float32_and_int32_leaves_and_still_checked():
    ddim = samplers.DDIM(eta=1)
    assert ddim.eta.dtype == jnp.float32 and float(ddim.eta) == 1.0
    lang = samplers.Langevin(n_steps=2.0, eps=np.float64(1e-5))
    assert lang.n_steps.dtype == jnp.int32 and lang.eps.dtype == jnp.float32 and lang.sigma_min is None
    with pytest.raises(ValueError, match="whole number"):
        samplers.Langevin(n_steps=2.5)
    with pytest.raises(ValueError, match="eta must be non-negative"):
        samplers.DDIM(eta=-1)
    with pytest.raises(TypeError, match="s_churn must be a number"):
        samplers.Heun(s_churn="lots")


def test_int_and_float_transform_settings_share_one_program():
    """Guidance classes built directly (not via their factories) store their settings as float32 too."""
    mix = mixtures.ring_2d()
    sig = schedules.karras(3, 0.1, 5.0, capacity=11)
    x = sampling.initial_noise(jax.random.key(0), (BATCH, 2), 5.0)
    labels = jnp.zeros((BATCH,), jnp.int32)
    uncond = jnp.full((BATCH,), -1, jnp.int32)
    for build in (lambda v: G.StaticThreshold(mix, -v, v), lambda v: G.DynamicThreshold(mix, 1, v),
                  lambda v: G.ClassifierFree(mix, v, uncond, rescale=0 * v)):
        sampling.sample_jit.clear_cache()  # count this test's programs, whatever other files compiled
        before = sampling.sample_jit._cache_size()
        a = sampling.sample(build(2), samplers.Euler(), sig, x, 0, labels)
        b = sampling.sample(build(2.0), samplers.Euler(), sig, x, 0, labels)
        assert sampling.sample_jit._cache_size() - before == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
