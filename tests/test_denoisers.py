"""Each parameterisation adapter recovers the exact denoiser from an exact network of its kind.

The "networks" below compute their targets from the VP / VE definitions directly (x_vp = a x0 + s eps,
v = a eps - s x0, score of x_vp), using the exact posterior mean of a Gaussian mixture, so the
adapters' algebra is checked against an independent derivation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import denoisers, mixtures, schedules

MIX = mixtures.random_mixture(jax.random.key(0), 4, 3)
AC = schedules.alphas_cumprod(schedules.vp_betas("scaled_linear"))
TRAIN_SIGMAS = np.sqrt((1 - AC.astype(np.float64)) / AC)


def _vp_net(prediction: str, sigma_of_t):
    """A network in VP coordinates that predicts exactly, built from the definitions."""

    def net(x_vp, t, cond):
        sigma = sigma_of_t(t)
        a = 1.0 / jnp.sqrt(1.0 + sigma**2)  # sqrt(abar)
        s = sigma * a  # sqrt(1 - abar)
        x = x_vp / a[:, None]
        x0 = MIX(x, sigma)
        eps = (x_vp - a[:, None] * x0) / s[:, None]
        return {"epsilon": eps, "v_prediction": a[:, None] * eps - s[:, None] * x0, "sample": x0,
                "score": -eps / s[:, None]}[prediction]

    return jax.tree_util.Partial(net)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "score"])
def test_discrete_vp_adapter_recovers_exact_denoiser(prediction):
    sig_train = jnp.asarray(TRAIN_SIGMAS, jnp.float32)
    sigma_of_t = lambda t: jnp.interp(t, jnp.arange(1000.0), sig_train)  # noqa: E731
    d = denoisers.DiscreteVPDenoiser(_vp_net(prediction, sigma_of_t), jnp.asarray(AC), prediction)
    x0 = MIX.sample(jax.random.key(1), 64)
    for t in (10, 500, 950):
        sigma = float(TRAIN_SIGMAS[t])
        x = x0 + sigma * jax.random.normal(jax.random.key(t), x0.shape)
        np.testing.assert_allclose(d(x, sigma), MIX(x, sigma), rtol=2e-4, atol=2e-4 * max(1.0, sigma))


def test_discrete_t_inverts_training_sigmas_including_fractional_steps():
    sig = jnp.asarray(TRAIN_SIGMAS, jnp.float32)
    t = jnp.array([0.0, 1.0, 17.0, 500.0, 998.0, 999.0, 12.25, 731.5])
    sigma = jnp.interp(t, jnp.arange(1000.0), sig)
    np.testing.assert_allclose(denoisers.sigma_to_discrete_t(sigma, sig), t, atol=2e-3)


def test_quantize_rounds_timesteps():
    seen = []
    net = jax.tree_util.Partial(lambda x, t, c: (seen.append(t), jnp.zeros_like(x))[1])
    d = denoisers.DiscreteVPDenoiser(net, jnp.asarray(AC), "epsilon", quantize=True)
    d(jnp.ones((1, 3)), float(TRAIN_SIGMAS[321]) * 1.0001)
    assert float(seen[0][0]) == 321.0


@pytest.mark.parametrize("prediction", ["score", "epsilon"])
def test_continuous_vp_adapter(prediction):
    bmin, bmax = 0.1, 20.0

    def sigma_of_t(t):
        log_abar = -0.5 * t**2 * (bmax - bmin) - t * bmin
        return jnp.sqrt(jnp.expm1(-log_abar))

    net = _vp_net(prediction, lambda tt: sigma_of_t(tt / 999.0))
    d = denoisers.ContinuousVPDenoiser(net, bmin, bmax, prediction=prediction)
    x0 = MIX.sample(jax.random.key(2), 32)
    for t in (0.05, 0.4, 0.9):
        sigma = float(sigma_of_t(jnp.float32(t)))
        np.testing.assert_allclose(float(d.t_of_sigma(jnp.float32(sigma))), t, rtol=1e-5)
        x = x0 + sigma * jax.random.normal(jax.random.key(3), x0.shape)
        np.testing.assert_allclose(d(x, sigma), MIX(x, sigma), rtol=2e-4, atol=2e-4 * max(1.0, sigma))


@pytest.mark.parametrize("noise_input", ["sigma", "log_sigma"])
def test_ve_score_adapter(noise_input):
    def net(x, c_noise, cond):
        sigma = jnp.exp(c_noise) if noise_input == "log_sigma" else c_noise
        return MIX.score(x, sigma)

    d = denoisers.VEDenoiser(jax.tree_util.Partial(net), "score", noise_input)
    x = MIX.sample(jax.random.key(4), 32) + 2.0 * jax.random.normal(jax.random.key(5), (32, 3))
    np.testing.assert_allclose(d(x, 2.0), MIX(x, 2.0), rtol=1e-4, atol=1e-4)


def test_edm_preconditioning_matches_table_1():
    sd, s = 0.5, 3.0
    seen = {}

    def net(x_in, c_noise, cond):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return jnp.ones_like(x_in)

    d = denoisers.EDMDenoiser(jax.tree_util.Partial(net), sd)
    x = jnp.full((2, 4), 2.0)
    out = d(x, s)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / np.sqrt(s**2 + sd**2)
    c_in = 1 / np.sqrt(s**2 + sd**2)
    np.testing.assert_allclose(out, c_skip * 2.0 + c_out, rtol=1e-6)
    np.testing.assert_allclose(seen["x_in"], c_in * 2.0, rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], np.log(s) / 4, rtol=1e-6)


def test_edm_training_target_gives_exact_denoiser():
    """A network that outputs the EDM target F for the true x0 makes D return that x0."""
    x0 = jax.random.normal(jax.random.key(6), (8, 5))
    noise = jax.random.normal(jax.random.key(7), (8, 5))
    sigma = jnp.linspace(0.01, 50.0, 8)
    target = denoisers.EDMDenoiser.training_target(x0, noise, sigma)
    d = denoisers.EDMDenoiser(jax.tree_util.Partial(lambda x, c, cond: target))
    np.testing.assert_allclose(d(x0 + sigma[:, None] * noise, sigma), x0, rtol=1e-4, atol=1e-4)


def test_unknown_prediction_type_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction, sample, score"):
        denoisers.DiscreteVPDenoiser(None, jnp.asarray(AC), "eps")


def test_adapters_are_pytrees_and_trace_their_network():
    net = jax.tree_util.Partial(lambda w, x, t, c: w * x, jnp.float32(2.0))
    d = denoisers.DiscreteVPDenoiser(net, jnp.asarray(AC), "sample")
    f = jax.jit(lambda d, x: d(x, 1.0))
    x = jnp.ones((2, 3))
    a = f(d, x)
    b = f(jax.tree_util.tree_map(lambda v: v * 2 if v.ndim == 0 else v, d), x)
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
    assert f._cache_size() == 1


def test_classifier_adapters_feed_the_training_coordinates():
    ac = jnp.asarray(schedules.alphas_cumprod(schedules.vp_betas("linear", 1000, 1e-4, 0.02)))
    t = jnp.array([0, 17, 500, 999])
    sigma = jnp.sqrt((1 - ac[t]) / ac[t])
    x = jnp.ones((4, 3))
    seen = denoisers.DiscreteVPClassifier(lambda x, t: (x, t), ac)(x, sigma)
    np.testing.assert_allclose(seen[1], t, atol=1e-3)
    np.testing.assert_allclose(seen[0][:, 0], jnp.sqrt(ac[t]), rtol=1e-5)
    xe, ce = denoisers.EDMClassifier(lambda x, c: (x, c), 0.5)(x, sigma)
    np.testing.assert_allclose(xe[:, 0], 1 / jnp.sqrt(sigma**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(ce, jnp.log(sigma) / 4, rtol=1e-6)


def test_classifier_adapters_live_beside_the_denoisers():
    from jaxdiff import losses

    assert losses.DiscreteVPClassifier is denoisers.DiscreteVPClassifier
    assert losses.EDMClassifier is denoisers.EDMClassifier
    assert denoisers.DiscreteVPClassifier.__module__ == "jaxdiff.denoisers"
