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
