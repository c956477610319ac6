"""Denoising and noisy-classifier losses: analytic minima on Gaussian data and the papers' objectives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses as L
from jaxdiff.denoisers import ContinuousVPDenoiser, DiscreteVPDenoiser, EDMDenoiser, VEDenoiser
from jaxdiff.mixtures import MixtureClassifier, make_mixture
from jaxdiff.schedules import alphas_cumprod, vp_betas

MU, VAR, DIM = 0.3, 0.16, 4  # x0 ~ N(MU, VAR I) in DIM dimensions
AC = alphas_cumprod(vp_betas("linear", 1000, 1e-4, 0.02))


def gaussian_denoiser(shrink=1.0):
    """The exact denoiser of N(MU, VAR) (shrink=1), or a mis-shrunk one."""
    def D(x, sigma, cond=None):
        s = sigma.reshape(-1, 1)
        return MU + shrink * VAR / (VAR + s * s) * (x - MU)
    return D


PAPER_WEIGHTS = {  # lambda(sigma) on ||D - x0||^2, written out from each paper
    "epsilon": lambda s, sd: 1 / s**2,
    "v": lambda s, sd: (1 + s**2) / s**2,
    "x0": lambda s, sd: np.ones_like(s),
    "edm": lambda s, sd: (s**2 + sd**2) / (s * sd) ** 2,
    "ncsn": lambda s, sd: 0.5 / s**2,
}


def expected_min(weighting, sigma, sd=0.5):
    """lambda(sigma) * posterior variance: the per-dimension loss of the exact denoiser at sigma."""
    return PAPER_WEIGHTS[weighting](sigma, sd) * VAR * sigma**2 / (VAR + sigma**2)


def lognormal_mean(f, p_mean=-1.2, p_std=1.2):
    z, w = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(w * f(np.exp(p_mean + p_std * z))) / np.sqrt(2 * np.pi))


def vp_t_mean(f, levels):
    t, w = np.polynomial.legendre.leggauss(200)
    t = levels.eps + (t + 1) / 2 * (1 - levels.eps)
    return float(np.sum(w * f(np.asarray(levels.sigma_of_t(jnp.asarray(t))))) * (1 - levels.eps) / 2)


sigmas_train = np.sqrt((1 - AC.astype(np.float64)) / AC)
geo = np.asarray(L.GeometricLevels(0.01, 1.0, 10).levels, np.float64)
CASES = {
    "ddpm": (L.ddpm_loss(AC), lambda: float(np.mean(expected_min("epsilon", sigmas_train)))),
    "v": (L.v_loss(AC), lambda: float(np.mean(expected_min("v", sigmas_train)))),
    "x0": (L.x0_loss(L.GeometricLevels(0.01, 1.0, 10)), lambda: float(np.mean(expected_min("x0", geo)))),
    "edm": (L.edm_loss(sigma_data=0.5), lambda: lognormal_mean(lambda s: expected_min("edm", s))),
    "ncsn": (L.ncsn_loss(0.01, 1.0, 10), lambda: float(np.mean(expected_min("ncsn", geo)))),
    "vp_continuous": (L.vp_continuous_loss(), lambda: vp_t_mean(lambda s: expected_min("epsilon", s),
                                                                  L.ContinuousVPLevels())),
}


@pytest.fixture(scope="module")
def gaussian_x0():
    return MU + np.sqrt(VAR) * jax.random.normal(jax.random.key(1), (40_000, DIM))


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_denoiser_attains_analytic_minimum(name, gaussian_x0):
    loss, analytic = CASES[name]
    key = jax.random.key(7)
    run = jax.jit(lambda shrink: loss(gaussian_denoiser(shrink), gaussian_x0, key))
    exact = np.asarray(run(1.0), np.float64)
    se = exact.std() / np.sqrt(exact.size)
    assert abs(exact.mean() - analytic()) < 5 * se + 1e-6, (exact.mean(), analytic(), se)
    # the same noise (same key): any other shrinkage does worse
    for shrink in (0.9, 1.1):
        assert float(np.mean(run(shrink))) > exact.mean() + 3 * se


def test_weightings_closed_form_relations(gaussian_x0):
    x0 = gaussian_x0[:64]
    sigma = jnp.exp(jnp.linspace(-4.0, 3.0, 64))
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    D = gaussian_denoiser(1.07)
    at = {w: np.asarray(L.DenoisingLoss(L.LogNormalLevels(), w, sigma_data=0.7).at(D, x0, sigma, noise))
          for w in L.WEIGHTINGS}
    s2 = np.asarray(sigma, np.float64) ** 2
    np.testing.assert_allclose(at["x0"], at["epsilon"] * s2, rtol=1e-5)
    np.testing.assert_allclose(at["v"], at["epsilon"] * (1 + s2), rtol=1e-5)
    np.testing.assert_allclose(at["edm"], at["epsilon"] * (s2 + 0.49) / 0.49, rtol=1e-5)
    np.testing.assert_allclose(at["ncsn"], at["epsilon"] / 2, rtol=1e-5)


# ---- the papers' objectives, written out by hand with the same randomness -------------------

def tiny_net(x, c, cond=None):
    """A fixed nonlinear 'network' of its input and noise conditioning."""
    w = jnp.linspace(-1.0, 1.0, DIM * DIM).reshape(DIM, DIM)
    return jnp.tanh(x @ w) * jnp.cos(c / 300.0)[:, None] + 0.1 * x


@pytest.fixture(scope="module")
def batch():
    x0 = jax.random.normal(jax.random.key(5), (256, DIM))
    return x0, jax.random.key(11)


def test_ddpm_epsilon_loss_is_ho_et_al_eq14(batch):
    x0, key = batch
    ours = L.ddpm_loss(AC)(DiscreteVPDenoiser(tiny_net, jnp.asarray(AC), "epsilon"), x0, key)
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
    eps = jax.random.normal(k_n, x0.shape)
    ab = jnp.asarray(AC)[t][:, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    ref = jnp.mean((eps - tiny_net(x_t, t.astype(jnp.float32))) ** 2, axis=1)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-6)


def test_v_loss_is_salimans_ho(batch):
    x0, key = batch
    ours = L.v_loss(AC)(DiscreteVPDenoiser(tiny_net, jnp.asarray(AC), "v_prediction"), x0, key)
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
    eps = jax.random.normal(k_n, x0.shape)
    a, s = jnp.sqrt(jnp.asarray(AC)[t])[:, None], jnp.sqrt(1 - jnp.asarray(AC)[t])[:, None]
    v = a * eps - s * x0
    ref = jnp.mean((v - tiny_net(a * x0 + s * eps, t.astype(jnp.float32))) ** 2, axis=1)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-6)


def test_edm_loss_is_karras_eq8(batch):
    x0, key = batch
    sd = 0.6
    ours = L.edm_loss(-1.2, 1.2, sd)(EDMDenoiser(tiny_net, sd), x0, key)
    k_s, k_n = jax.random.split(key)
    sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(k_s, (x0.shape[0],)))
    n = jax.random.normal(k_n, x0.shape)
    c_in = 1 / jnp.sqrt(sigma**2 + sd**2)[:, None]
    target = EDMDenoiser.training_target(x0, n, sigma, sd)
    ref = jnp.mean((tiny_net(c_in * (x0 + sigma[:, None] * n), jnp.log(sigma) / 4) - target) ** 2, axis=1)
    np.testing.assert_allclose(ours, ref, rtol=5e-4, atol=1e-6)


def test_ncsn_loss_is_song_ermon_eq2(batch):
    x0, key = batch
    ours = L.ncsn_loss(0.01, 1.0, 10, reduce="sum")(VEDenoiser(tiny_net, "score"), x0, key)
    k_s, k_n = jax.random.split(key)
    levels = jnp.asarray(np.geomspace(1.0, 0.01, 10), jnp.float32)
    sigma = levels[jax.random.randint(k_s, (x0.shape[0],), 0, 10)][:, None]
    x = x0 + sigma * jax.random.normal(k_n, x0.shape)
    ref = 0.5 * sigma[:, 0] ** 2 * jnp.sum((tiny_net(x, sigma[:, 0]) + (x - x0) / sigma**2) ** 2, axis=1)
    np.testing.assert_allclose(ours, ref, rtol=5e-4, atol=1e-6)


def test_vp_continuous_loss_is_score_sde_dsm(batch):
    x0, key = batch
    b0, b1 = 0.1, 20.0
    ours = L.vp_continuous_loss(b0, b1, 1e-5)(ContinuousVPDenoiser(tiny_net, b0, b1, "score"), x0, key)
    k_t, k_n = jax.random.split(key)
    t = jax.random.uniform(k_t, (x0.shape[0],), jnp.float32, 1e-5, 1.0)
    z = jax.random.normal(k_n, x0.shape)
    log_mean = (-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)[:, None]
    std = jnp.sqrt(1 - jnp.exp(2 * log_mean))
    score = tiny_net(jnp.exp(log_mean) * x0 + std * z, t * 999)
    ref = jnp.mean((score * std + z) ** 2, axis=1)
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="weighting"):
        L.DenoisingLoss(L.LogNormalLevels(), "snr")
    with pytest.raises(ValueError, match="reduce"):
        L.DenoisingLoss(L.LogNormalLevels(), "x0", reduce="max")


# ---- noisy classifier -----------------------------------------------------------------------

def test_exact_noisy_classifier_minimises_cross_entropy():
    mix = make_mixture([[-1.0, 0.0], [1.0, 0.5], [0.0, 1.5]], [0.5, 0.4, 0.6], [1.0, 2.0, 1.5], [0, 1, 1])
    kc, ks, kl = jax.random.split(jax.random.key(2), 3)
    comps = jax.random.categorical(kc, mix.log_weights, shape=(10_000,))
    x0 = mix.means[comps] + jnp.sqrt(mix.variances[comps]) * jax.random.normal(ks, (10_000, 2))
    labels = mix.component_classes[comps]
    loss = L.NoisyClassifierLoss(L.LogNormalLevels(-0.5, 1.0))
    exact = MixtureClassifier(mix)
    run = jax.jit(lambda temp, scale: jnp.mean(loss(lambda x, s: exact(x, scale * s) * temp, x0, kl, labels)))
    ce = {temp: float(run(temp, 1.0)) for temp in (0.8, 1.0, 1.25)}
    assert ce[1.0] < ce[0.8] and ce[1.0] < ce[1.25], ce
    # evaluating the classifier at a different noise level than the one added is worse
    wrong = float(run(1.0, 2.0))
    assert wrong > ce[1.0] + 1e-3


# ---- one calling convention ---------------------------------------------------------------------

def test_losses_accept_an_int_seed_like_sample():
    x0 = jax.random.normal(jax.random.key(5), (8, DIM))
    loss = L.edm_loss()
    np.testing.assert_array_equal(loss(gaussian_denoiser(), x0, 7), loss(gaussian_denoiser(), x0, jax.random.key(7)))
    np.testing.assert_array_equal(loss(gaussian_denoiser(), x0, np.int64(7)), loss(gaussian_denoiser(), x0, 7))
    ce = L.NoisyClassifierLoss(L.LogNormalLevels())
    clf = lambda x, s: jnp.stack([x[:, 0], -x[:, 0]], axis=-1)  # noqa: E731
    labels = jnp.array([0, 1] * 4)
    np.testing.assert_array_equal(ce(clf, x0, 3, labels), ce(clf, x0, jax.random.key(3), labels))
    with pytest.raises(TypeError, match=r"key must be a PRNG key.*or an int seed"):
        loss(gaussian_denoiser(), x0, 1.5)


def test_every_loss_takes_model_x0_key_then_conditioning():
    """DenoisingLoss and NoisyClassifierLoss share one argument order, as the sampler runner (key before cond)."""
    import inspect

    for cls in (L.DenoisingLoss, L.NoisyClassifierLoss):
        call = list(inspect.signature(cls.__call__).parameters)[1:]
        at = list(inspect.signature(cls.at).parameters)[1:]
        assert call[1:3] == ["x0", "key"] and at[1:4] == ["x0", "sigma", "noise"], (cls, call, at)
        assert len(call) == 4 and len(at) == 5  # the conditioning (cond / labels) is last in both
    # the old classifier order (labels before key) is a clear error, not a silent misuse
    x0 = jax.random.normal(jax.random.key(5), (4, DIM))
    clf = lambda x, s: jnp.stack([x[:, 0], -x[:, 0]], axis=-1)  # noqa: E731
    with pytest.raises(TypeError, match=r"loss\(classifier, x0, key, labels\)"):
        L.NoisyClassifierLoss(L.LogNormalLevels())(clf, x0, jnp.array([0, 1, 0, 1]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"labels must be integers"):
        L.NoisyClassifierLoss(L.LogNormalLevels())(clf, x0, jax.random.key(0), jnp.zeros((4,)))


def test_shifted_cross_entropy_is_cross_entropy_of_a_shifted_image():
    """max_shift 0: the plain cross-entropy; max_shift 1: the logits of the image moved by the drawn offset, the
    uncovered border -1."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 1))
    labels = jnp.array([0, 1, 2])
    clf = lambda im: im.reshape(len(im), -1)[:, :3] * 2.0  # noqa: E731 (logits from three pixels)
    plain = -jnp.take_along_axis(jax.nn.log_softmax(clf(x)), labels[:, None], 1)[:, 0]
    np.testing.assert_allclose(L.ShiftedCrossEntropy(0)(clf, x, jax.random.PRNGKey(1), labels), plain, rtol=1e-6)
    key = jax.random.PRNGKey(2)
    offsets = jax.random.randint(key, (3, 2), 0, 3)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    moved = jnp.stack([padded[i, o[0]:o[0] + 5, o[1]:o[1] + 5] for i, o in enumerate(np.asarray(offsets))])
    want = -jnp.take_along_axis(jax.nn.log_softmax(clf(moved)), labels[:, None], 1)[:, 0]
    np.testing.assert_allclose(L.ShiftedCrossEntropy(1)(clf, x, key, labels), want, rtol=1e-6)
