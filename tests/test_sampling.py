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


# ---- plain callables, dtypes -------------------------------------------------------------------

@pytest.mark.parametrize("run", ["sample", "trajectory", "invert"])
def test_plain_callable_denoiser_gets_an_error_naming_the_wrappers(run):
    sig = schedules.karras(4, 0.01, 40.0, capacity=4)
    scale = jnp.asarray(1.0)
    for fn in (lambda x, s, c: MIX(x, s) * scale, MIX.__call__):  # a closure over an array; a bound method
        with pytest.raises(TypeError, match=r"jax\.tree_util\.Partial.*jaxdiff\.pytree_dataclass"):
            if run == "invert":
                sampling.invert(fn, X, sig)
            else:
                getattr(sampling, run)(fn, Euler(), sig, X)
    # the fix the message names works
    out = sampling.sample(jax.tree_util.Partial(lambda x, s, c, k: MIX(x, s) * k, k=scale), Euler(), sig, X)
    np.testing.assert_allclose(out, sampling.sample(MIX, Euler(), sig, X), rtol=1e-6)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "dopri5"])
def test_bfloat16_x_is_integrated_in_float32_and_returned_in_bfloat16(name):
    sig = schedules.karras(6, 0.01, 40.0, capacity=8)
    x = X.astype(jnp.bfloat16)
    ref = sampling.sample(MIX, get_sampler(name), sig, x.astype(jnp.float32), 3)  # same start, float32 all the way
    out = sampling.sample(MIX, get_sampler(name), sig, x, 3)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2**-7, atol=1e-3)
    if name == "euler":
        xs, _ = sampling.trajectory(MIX, Euler(), sig, x)
        assert xs.dtype == jnp.bfloat16 and np.array_equal(np.asarray(xs[-1], np.float32), np.asarray(out, np.float32))
        assert sampling.invert(MIX, out, sig).dtype == jnp.bfloat16
        assert sampling.sample(MIX, Euler(), sig, x, differentiable=True).dtype == jnp.bfloat16


def test_integer_x_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        sampling.sample(MIX, Euler(), schedules.karras(4, 0.01, 40.0, capacity=4), jnp.ones((2, 2), jnp.int32))


# ---- trajectories ------------------------------------------------------------------------------

def test_trajectory_holds_count_plus_one_states_whatever_the_capacity():
    big = schedules.karras(5, 0.01, 40.0, capacity=400)
    xs, _ = sampling.trajectory(MIX, DDIM(), big, X)
    assert xs.shape == (6,) + X.shape
    np.testing.assert_allclose(xs[0], X)
    np.testing.assert_allclose(xs[-1], sampling.sample(MIX, DDIM(), big, X), rtol=1e-6, atol=1e-6)
    # the compiled program's output is the used steps only, not capacity + 1 states
    compiled = sampling.trajectory_jit.lower(MIX, DDIM(), big, X, jax.random.key(0), None, 5).compile()
    out_bytes = compiled.memory_analysis().output_size_in_bytes
    assert out_bytes < 2 * 6 * X.size * 4, out_bytes


# ---- differentiable sampling -------------------------------------------------------------------

SMOOTH = mixtures.ring_2d(std=1.0)  # overlapping modes: a smooth flow, so finite differences are accurate


def _guided(scale):
    from jaxdiff import guidance as G

    return G.apply(SMOOTH, G.classifier_free(scale, jnp.array([-1], jnp.int32)))


def test_differentiable_path_gives_the_same_samples_and_respects_count_and_start():
    sig = schedules.karras(7, 0.01, 40.0, capacity=12)
    for sampler in (get_sampler("dpmpp_2m_sde"), get_sampler("heun")):
        a = sampling.sample(MIX, sampler, sig, X, 4, start=2)
        b = sampling.sample(MIX, sampler, sig, X, 4, start=2, differentiable=True)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_through_sampling_match_finite_differences():
    sig = schedules.karras(8, 0.02, 20.0, capacity=8)
    x = jax.random.normal(jax.random.key(4), (8, 2)) * 20.0
    labels = jnp.array([0, 1] * 4, jnp.int32)
    target = jnp.array([1.0, -2.0])

    def loss(scale, x_):
        out = sampling.sample(_guided(scale), DDIM(), sig, x_, 0, labels, differentiable=True)
        return jnp.mean(jnp.sum((out - target) ** 2, axis=-1))

    g_scale, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(1.5, x)
    f = jax.jit(loss)
    h = 1e-2
    fd_scale = (float(f(1.5 + h, x)) - float(f(1.5 - h, x))) / (2 * h)
    np.testing.assert_allclose(float(g_scale), fd_scale, rtol=2e-2)
    v = jax.random.normal(jax.random.key(5), x.shape)
    fd_x = (float(f(1.5, x + h * v)) - float(f(1.5, x - h * v))) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g_x, v)), fd_x, rtol=2e-2)
    assert abs(fd_scale) > 1e-3 and abs(fd_x) > 1e-3  # the checks are not comparing zeros


def test_reverse_mode_through_the_default_loop_names_the_differentiable_path():
    sig = schedules.karras(4, 0.02, 20.0, capacity=8)
    loss = lambda x_: jnp.sum(sampling.sample(SMOOTH, Euler(), sig, x_) ** 2)  # noqa: E731
    for f in (jax.grad(loss), jax.grad(jax.jit(loss)), jax.jit(jax.grad(loss))):
        with pytest.raises(TypeError, match=r"differentiable=True"):
            f(X)
    with pytest.raises(TypeError, match=r"differentiable=True"):
        jax.grad(lambda x0: jnp.sum(sampling.invert(SMOOTH, x0, sig)))(X)
    # forward mode through the default loop still works and agrees with the differentiable path
    v = jnp.ones_like(X)
    _, jvp_plain = jax.jvp(loss, (X,), (v,))
    g = jax.grad(lambda x_: jnp.sum(sampling.sample(SMOOTH, Euler(), sig, x_, differentiable=True) ** 2))(X)
    np.testing.assert_allclose(float(jvp_plain), float(jnp.vdot(g, v)), rtol=1e-4)


# ---- DDIM inversion ----------------------------------------------------------------------------

def test_current_level_inversion_round_trips_better_than_diffusers_target_level():
    """On an exact mixture, inverting with the denoiser at the sample's own level beats diffusers' convention."""
    x0 = MIX.sample(jax.random.key(1), 512)
    sig = schedules.karras(50, 0.002, 80.0, capacity=64)
    med = {}
    for where in ("current", "target"):
        latent = sampling.invert(MIX, x0, sig, evaluate_at=where)
        rec = sampling.sample(MIX, DDIM(), sig, latent)
        med[where] = float(np.median(np.linalg.norm(np.asarray(rec - x0), axis=-1)))
    assert med["current"] < 0.15 and med["target"] < 0.5, med
    assert med["current"] < 0.5 * med["target"], med
    with pytest.raises(ValueError, match="evaluate_at must be one of current, target"):
        sampling.invert(MIX, x0, sig, evaluate_at="next")


def test_target_level_inversion_is_the_diffusers_ddim_inverse_step():
    """evaluate_at="target": x' = x + (s' - s) eps_hat(x, s'), DDIMInverseScheduler's step in VE coordinates."""
    sig = schedules.from_array([3.0, 1.0, 0.5, 0.0])
    x0 = MIX.sample(jax.random.key(2), 8)
    x, v = np.asarray(x0, np.float64), [0.0, 0.5, 1.0, 3.0]
    for s, s_next in zip(v[:-1], v[1:]):  # the VP step of diffusers, divided by sqrt(abar'): same map
        abar, abar_next = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        x_vp = x * np.sqrt(abar)
        eps = (x - np.asarray(MIX(jnp.asarray(x, jnp.float32), s_next), np.float64)) / s_next
        x0_vp = (x_vp - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        x = (np.sqrt(abar_next) * x0_vp + np.sqrt(1 - abar_next) * eps) / np.sqrt(abar_next)
    np.testing.assert_allclose(sampling.invert(MIX, x0, sig, evaluate_at="target"), x, rtol=1e-4, atol=1e-4)
