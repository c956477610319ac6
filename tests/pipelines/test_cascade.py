"""Cascades: two stages (an exact Gaussian-mixture base, an exact Gaussian upsampler) in one compiled program."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import conditioning, guidance, mixtures, sampling, samplers, schedules
from jaxdiff._pytree import pytree_dataclass
from jaxdiff.pipelines import cascade as C

B, LOW, HIGH, CAP = 3, (4, 4, 1), (8, 8, 1), 11  # unusual capacity: no other test compiled these shapes


@pytree_dataclass
class GaussianUpsampler:
    """Exact denoiser (EDM coordinates) of ``x0 ~ N(low, (s^2 + level^2) I)`` given the concatenated ``low`` channel
    and the augmentation level: ``D = (v x + sigma^2 low) / (v + sigma^2)``, ``v = s^2 + level^2``."""

    s: Any

    def __call__(self, x: Any, sigma: Any, cond: Any) -> Any:
        sample, low = x[..., :1], x[..., 1:]
        sig2 = jnp.reshape(jnp.broadcast_to(sigma, (x.shape[0],)), (-1, 1, 1, 1)) ** 2
        v = self.s**2 + jnp.reshape(cond["noise_level"], (-1, 1, 1, 1)) ** 2
        return (v * sample + sig2 * low) / (v + sig2)


def _mixture():
    return mixtures.random_mixture(jax.random.key(0), num_modes=4, dim=16, num_classes=2)


def _clip_half(x):
    return jnp.clip(x, -0.5, 0.5)


def _stages(steps1, steps2, scale, augment, s=0.2, **up_fields):
    labels = jnp.array([0, 1, 0])
    base = C.Stage(_mixture(), samplers.DPMSolverPP2M(), schedules.karras(steps1, 0.02, 20.0, capacity=CAP), LOW,
                   transform=guidance.classifier_free(scale, jnp.full((B,), -1)), cond=labels)
    sig2 = schedules.karras(steps2, 0.02, 10.0, capacity=CAP)
    up = C.Stage(GaussianUpsampler(jnp.float32(s)), samplers.Euler(), sig2, HIGH, augment=jnp.float32(augment),
                 upsample="nearest", **up_fields)
    return base, up


def _by_hand(steps1, steps2, scale, augment, key, noise_scale=1.0, previous=lambda x: x):
    """The same two stages run one after another with the core's pieces (documented key streams); the upsampler's
    start noise times ``noise_scale``, its input ``previous(low)``."""
    base, up = _stages(steps1, steps2, scale, augment)
    k1, k2 = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    den1 = guidance.apply(_mixture(), guidance.classifier_free(scale, jnp.full((B,), -1)))
    x1 = jax.random.normal(jax.random.fold_in(k1, 0), (B,) + LOW) * base.sigmas.values[0]
    low = sampling.sample(den1, base.sampler, base.sigmas, x1, jax.random.fold_in(k1, 2), base.cond)
    cond_img = jnp.repeat(jnp.repeat(previous(low), 2, axis=1), 2, axis=2)  # nearest x2
    cond_img = cond_img + augment * jax.random.normal(jax.random.fold_in(k2, 1), cond_img.shape)
    den2 = conditioning.apply(up.network, conditioning.concat(cond_img))
    x2 = jax.random.normal(jax.random.fold_in(k2, 0), (B,) + HIGH) * up.sigmas.values[0] * noise_scale
    high = sampling.sample(den2, up.sampler, up.sigmas, x2, jax.random.fold_in(k2, 2),
                           {"noise_level": jnp.full((B,), augment)})
    return low, high


def test_cascade_compiles_once_and_equals_the_stages_run_by_hand():
    key = jax.random.key(7)
    C.cascade_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = C.cascade_jit._cache_size()
    runs = [(5, 4, 2.0, 0.1), (9, 7, 4.0, 0.5)]
    outs = [C.cascade_jit(_stages(*r), key, B) for r in runs]
    assert C.cascade_jit._cache_size() - before == 1  # steps, scales and augmentation are runtime values
    for r, (low, high) in zip(runs, outs):
        ref_low, ref_high = _by_hand(*r, key)
        np.testing.assert_allclose(low, ref_low, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(high, ref_high, atol=1e-5, rtol=1e-5)
    assert np.abs(outs[0][0] - outs[1][0]).max() > 1e-3 and np.abs(outs[0][1] - outs[1][1]).max() > 1e-3


def test_start_noise_scale_and_previous_transform_act_as_run_by_hand():
    """GLIDE's upsampler fields: a traced start-noise temperature and a transform of the previous output."""
    key = jax.random.key(11)
    outs = [C.cascade_jit(_stages(5, 4, 2.0, 0.1, noise_scale=jnp.float32(t), previous_transform=_clip_half), key, B)
            for t in (0.5, 0.997)]
    for t, (low, high) in zip((0.5, 0.997), outs):
        ref_low, ref_high = _by_hand(5, 4, 2.0, 0.1, key, noise_scale=t, previous=_clip_half)
        np.testing.assert_allclose(high, ref_high, atol=1e-5, rtol=1e-5)
        assert float(jnp.abs(low).max()) > 0.5  # the transform did something
    plain = C.cascade_jit(_stages(5, 4, 2.0, 0.1), key, B)[1]
    assert np.abs(outs[1][1] - plain).max() > 1e-3


def test_second_stage_follows_the_first_without_augmentation():
    """With no augmentation and a narrow upsampler prior the high-resolution sample is the upsampled base."""
    base, up = _stages(6, 10, 1.0, 0.0, s=1e-3)
    low, high = C.cascade_jit((base, up), jax.random.key(3), B)
    np.testing.assert_allclose(high, jnp.repeat(jnp.repeat(low, 2, axis=1), 2, axis=2), atol=5e-3)
    assert float(jnp.std(low)) > 0.3  # a non-trivial base sample


def test_later_stage_needs_an_upsample_method():
    base, up = _stages(3, 3, 1.0, 0.0)
    with pytest.raises(ValueError, match="upsample="):
        C.cascade((base, C.Stage(up.network, up.sampler, up.sigmas, HIGH)), jax.random.key(0), B)
