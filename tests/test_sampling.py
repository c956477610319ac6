"""The compiled runner: validation, the NaN/Inf guard, progress, start offsets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import mixtures, progress, sampling, schedules
from jaxdiff.samplers import DDIM, Euler, get_sampler

MIX = mixtures.ring_2d()
X = jax.random.normal(jax.random.key(0), (16, 2)) * 40.0


def test_unknown_sampler_and_schedule_list_valid_names():
    with pytest.raises(ValueError, match="valid samplers: .*ddim.*euler"):
        get_sampler("eulr")
    with pytest.raises(ValueError, match="valid schedules: .*karras"):
        schedules.get_schedule("karas")


def test_increasing_sigmas_are_rejected_with_the_position():
    bad = schedules.from_array([10.0, 5.0, 6.0, 0.0])
    with pytest.raises(ValueError, match=r"strictly decrease, but sigmas\[1\] = 5 <= sigmas\[2\] = 6"):
        sampling.sample(MIX, Euler(), bad, X)


@pytest.mark.parametrize("steps", [0, -3])
def test_non_positive_steps_are_rejected(steps):
    sig = schedules.Sigmas(schedules.karras(5, 0.01, 40.0, capacity=8).values, jnp.asarray(steps, jnp.int32))
    with pytest.raises(ValueError, match="number of steps must be positive"):
        sampling.sample(MIX, Euler(), sig, X)


def test_steps_above_capacity_are_rejected():
    sig = schedules.Sigmas(schedules.karras(5, 0.01, 40.0, capacity=8).values, jnp.asarray(9, jnp.int32))
    with pytest.raises(ValueError, match="exceed the schedule's capacity of 8"):
        sampling.sample(MIX, Euler(), sig, X)


def test_mismatched_cond_batch_is_rejected():
    sig = schedules.karras(5, 0.01, 40.0, capacity=8)
    with pytest.raises(ValueError, match="conditioning has batch size 3 but x has batch size 16"):
        sampling.sample(MIX, Euler(), sig, X, 0, jnp.zeros((3,), jnp.int32))


def test_bad_start_is_rejected():
    sig = schedules.karras(5, 0.01, 40.0, capacity=8)
    with pytest.raises(ValueError, match=r"start must be in \[0, 5\)"):
        sampling.sample(MIX, Euler(), sig, X, start=5)


def test_nan_guard_names_the_first_bad_step():
    sig = schedules.karras(10, 0.01, 40.0, capacity=16)
    level = float(sig.values[4])

    def broken(x, sigma, cond):  # a denoiser that fails below a noise level
        return jnp.where(sigma < level + 1e-6, jnp.nan, MIX(x, sigma))

    d = jax.tree_util.Partial(broken)
    with pytest.raises(FloatingPointError, match=r"first at step 4 \(sigma"):
        sampling.sample(d, Euler(), sig, X)
    out = sampling.sample(d, Euler(), sig, X, check_finite=False)
    assert np.isnan(np.asarray(out)).all()


def test_progress_reports_every_step(monkeypatch):
    seen = []
    monkeypatch.setattr(progress, "_update", lambda i, total: seen.append((int(i), int(total))))
    sig = schedules.karras(7, 0.01, 40.0, capacity=16)
    sampling.sample(MIX, Euler(), sig, X, progress=True)
    jax.effects_barrier()
    assert seen == [(i, 7) for i in range(7)]


def test_start_skips_steps_like_running_the_tail_schedule():
    sig = schedules.karras(12, 0.01, 40.0, capacity=16)
    tail = schedules.from_array(sig.used()[4:], capacity=16)
    x = MIX.sample(jax.random.key(1), 16) + float(sig.values[4]) * jax.random.normal(jax.random.key(2), (16, 2))
    a = sampling.sample(MIX, DDIM(), sig, x, start=4)
    b = sampling.sample(MIX, DDIM(), tail, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_final_step_to_zero_returns_the_denoised_sample():
    """Euler's last move to sigma = 0 is exactly D(x, sigma_last) (Karras et al. 2022, Alg. 1)."""
    sig = schedules.from_array([2.0, 0.0])
    np.testing.assert_allclose(sampling.sample(MIX, Euler(), sig, X), MIX(X, 2.0), rtol=1e-4, atol=1e-4)


def test_initial_noise_scale():
    x = sampling.initial_noise(jax.random.key(3), (20000, 2), 3.0, sigma_data=4.0)
    np.testing.assert_allclose(np.std(np.asarray(x)), 5.0, rtol=0.02)
