"""Invalid sampler names and options raise clear errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxdiff import mixtures, sampling, schedules
from jaxdiff.samplers import DDIM, DDPM, SAMPLERS, Heun, Langevin, get_sampler


def test_unknown_sampler_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'nope'") as e:
        get_sampler("nope")
    for name in SAMPLERS:
        assert name in str(e.value)


@pytest.mark.parametrize("name, options, message", [
    ("ddim", {"eta": -0.5}, "eta must be non-negative"),
    ("euler_ancestral", {"eta": -1.0}, "eta must be non-negative"),
    ("dpmpp_2m_sde", {"eta": -1.0}, "eta must be non-negative"),
    ("ddpm", {"variance": "learned"}, "unknown DDPM variance 'learned'; valid: fixed_small, fixed_large"),
    ("heun", {"s_churn": -1.0}, "s_churn must be non-negative"),
    ("langevin", {"eps": 0.0}, "eps must be positive"),
    ("pc", {"snr": -0.1}, "snr must be non-negative"),
    ("dopri5", {"rtol": 0.0}, "rtol must be positive"),
    ("euler", {"eta": 1.0}, "valid options: none"),
    ("ddim", {"etta": 1.0}, "valid options: eta"),
])
def test_invalid_options_raise(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_sampler(name, **options)


def test_traced_options_are_not_checked_and_do_not_recompile() -> None:
    """Options are pytree leaves: changing eta reuses the compiled runner."""
    mix = mixtures.ring_2d()
    sigmas = schedules.karras(4, 0.01, 10.0, capacity=8)
    x = jnp.ones((3, 2))
    sampling.sample_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = sampling.sample_jit._cache_size()
    for eta in (0.0, 0.3, 1.0):
        sampling.sample(mix, DDIM(eta=eta), sigmas, x, 0)
    assert sampling.sample_jit._cache_size() - before == 1
    DDPM(variance="fixed_large")  # valid values pass
    jax.tree_util.tree_map(lambda v: v, DDIM(eta=0.5))  # unflattening with placeholders does not validate


def test_schedule_dependent_samplers_need_prepare() -> None:
    step = lambda s: s.step(lambda x, sg: x, s.init(jnp.ones((1, 2))), jnp.ones((1, 2)), 1.0, 0.5, jax.random.key(0))  # noqa: E731
    with pytest.raises(ValueError, match="prepare"):
        step(Heun())
    with pytest.raises(ValueError, match="prepare"):
        step(Langevin())


def test_invert_rejects_bad_start() -> None:
    with pytest.raises(ValueError, match="start must be in"):
        sampling.invert(mixtures.ring_2d(), jnp.ones((2, 2)), schedules.karras(4, 0.01, 10.0, capacity=8), start=4)
