"""Guidance transforms against exact Gaussian-mixture targets, closed forms and numpy/diffusers references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance as G
from jaxdiff._pytree import pytree_dataclass
from jaxdiff import mixtures, sampling, samplers, schedules
from jaxdiff.denoisers import vp_output_to_x0

SIGMAS = (0.05, 0.4, 1.5, 8.0)
# one compiled program per denoiser structure (eager op-by-op dispatch is slow on a busy CPU)
call = jax.jit(lambda den, x, sigma, cond: den(x, sigma, cond))


# ---- independent float64 numpy re-derivation of the mixture denoiser ---------------------------

def np_denoiser(mix: mixtures.GaussianMixture, x: np.ndarray, sigma: float, label: int | None) -> np.ndarray:
    """Posterior mean E[x0 | x] of a diagonal mixture (restricted to class ``label``), float64."""
    mu = np.asarray(mix.means, np.float64)
    var = np.asarray(mix.variances, np.float64)
    logw = np.asarray(mix.log_weights, np.float64)
    classes = np.asarray(mix.component_classes)
    xf = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    out = np.zeros_like(xf)
    for b in range(xf.shape[0]):
        keep = np.ones_like(classes, bool) if label is None or label[b] < 0 else classes == label[b]
        tot = var + sigma**2
        logp = logw - 0.5 * np.sum((xf[b] - mu) ** 2 / tot + np.log(2 * np.pi * tot), axis=1)
        logp = np.where(keep, logp, -np.inf)
        r = np.exp(logp - logp.max())
        r /= r.sum()
        out[b] = r @ (mu + var / tot * (xf[b] - mu))
    return out.reshape(x.shape)


@pytest.fixture(scope="module")
def mix():
    return mixtures.random_mixture(jax.random.key(0), num_modes=6, dim=4, num_classes=2)


@pytest.fixture(scope="module")
def batch(mix):
    x = 2.0 * jax.random.normal(jax.random.key(1), (6, 2, 2))  # image-like trailing axes, 4 features
    labels = jnp.array([0, 1, 0, 1, 1, 0], jnp.int32)
    return x, labels


UNCOND = jnp.array([-1], jnp.int32)  # broadcast over the batch


# ---- classifier-free guidance ------------------------------------------------------------------

@pytest.mark.parametrize("sigma", SIGMAS)
def test_cfg_scale_one_is_conditional_and_zero_unconditional(mix, batch, sigma):
    x, labels = batch
    cond = np_denoiser(mix, x, sigma, np.asarray(labels))
    uncond = np_denoiser(mix, x, sigma, None)
    assert np.abs(cond - uncond).max() > 1e-2  # the two targets really differ at this sigma
    one = call(G.apply(mix, G.classifier_free(1.0, UNCOND)), x, sigma, labels)
    zero = call(G.apply(mix, G.classifier_free(0.0, UNCOND)), x, sigma, labels)
    tol = 2e-5 * max(1.0, np.abs(cond).max())
    np.testing.assert_allclose(one, cond, atol=tol)
    np.testing.assert_allclose(zero, uncond, atol=tol)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_cfg_scale_three_matches_hand_computation(mix, batch, sigma):
    x, labels = batch
    c = np_denoiser(mix, x, sigma, np.asarray(labels))
    u = np_denoiser(mix, x, sigma, None)
    want = u + 3.0 * (c - u)
    got = G.apply(mix, G.classifier_free(3.0, jnp.full((6,), -1)))(x, sigma, labels)
    np.testing.assert_allclose(got, want, atol=5e-5 * max(1.0, np.abs(want).max()))


def test_cfg_per_sample_scale_and_negative_conditioning(mix, batch):
    x, labels = batch
    scales = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    got = call(G.apply(mix, G.classifier_free(scales, UNCOND)), x, 0.7, labels)
    c = np_denoiser(mix, x, 0.7, np.asarray(labels))
    u = np_denoiser(mix, x, 0.7, None)
    np.testing.assert_allclose(got, u + np.asarray(scales)[:, None, None] * (c - u), atol=1e-4)
    # a negative prompt: the other class takes the place of the unconditional branch
    neg = 1 - labels
    got = call(G.apply(mix, G.classifier_free(2.0, neg)), x, 0.7, labels)
    n = np_denoiser(mix, x, 0.7, np.asarray(neg))
    np.testing.assert_allclose(got, n + 2.0 * (c - n), atol=1e-4)


def test_cfg_makes_one_batched_inner_call(mix, batch):
    x, labels = batch
    calls = []

    def spy(x_, s_, c_):
        calls.append((x_.shape, s_.shape, c_.shape))
        return mix(x_, s_, c_)

    G.ClassifierFree(spy, jnp.float32(2.0), UNCOND)(x, 0.5, labels)
    assert calls == [((12, 2, 2), (12,), (12,))]


def test_cfg_uncond_shape_errors(mix, batch):
    x, labels = batch
    with pytest.raises(ValueError, match="uncond has shape"):
        G.apply(mix, G.classifier_free(2.0, jnp.full((4,), -1)))(x, 0.5, labels)
    with pytest.raises(ValueError, match="structure"):
        call(G.apply(mix, G.classifier_free(2.0, {"labels": UNCOND})), x, 0.5, labels)
    with pytest.raises(ValueError, match="rescale_space"):
        G.classifier_free(2.0, UNCOND, rescale_space="eps")


def test_stack_cond_pytree():
    cond = {"emb": jnp.ones((3, 5, 8)), "pooled": jnp.ones((3, 4))}
    uncond = {"emb": jnp.zeros((1, 5, 8)), "pooled": jnp.zeros((3, 4))}
    both = G.stack_cond(cond, uncond)
    assert both["emb"].shape == (6, 5, 8) and both["pooled"].shape == (6, 4)
    np.testing.assert_array_equal(both["emb"][:3], 1.0)
    np.testing.assert_array_equal(both["emb"][3:], 0.0)


def np_sample(mix: mixtures.GaussianMixture, rng: np.random.Generator, n: int, label: int) -> np.ndarray:
    """Exact samples of one class of a mixture, in numpy."""
    keep = np.asarray(mix.component_classes) == label
    w = np.exp(np.asarray(mix.log_weights, np.float64)) * keep
    k = rng.choice(len(w), size=n, p=w / w.sum())
    return np.asarray(mix.means)[k] + np.sqrt(np.asarray(mix.variances))[k] * rng.standard_normal((n, mix.dim))


def np_sliced_wasserstein(a: np.ndarray, ref: np.ndarray, dirs: np.ndarray) -> float:
    """Sliced 2-Wasserstein distance of samples ``a`` (n, d) to a large reference set, along unit ``dirs`` (d, P).

    The reference enters through its quantiles at ``(i + 1/2) / n``, so its own sampling noise is small.
    """
    pa = np.sort(np.asarray(a, np.float64) @ dirs, axis=0)
    q = np.quantile(np.asarray(ref, np.float64) @ dirs, (np.arange(a.shape[0]) + 0.5) / a.shape[0], axis=0)
    return float(np.sqrt(np.mean((pa - q) ** 2)))


@pytest.fixture(scope="module")
def ring_setup():
    """Exact class-1 samples of the ring, the exact-vs-exact floor and shared sampling inputs."""
    ring = mixtures.ring_2d()
    n = 4000
    labels = jnp.ones((n,), jnp.int32)
    sig = schedules.karras(30, 0.002, 80.0, capacity=32)
    x = sampling.initial_noise(jax.random.key(11), (n, 2), 80.0)
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((2, 128))
    dirs /= np.linalg.norm(dirs, axis=0)
    exact = np_sample(ring, rng, 10 * n, 1)
    # exact samples' own distances vary a lot (mode occupancies are multinomial): take the worst of 12
    floor = max(np_sliced_wasserstein(np_sample(ring, rng, n, 1), exact, dirs) for _ in range(12))
    return dict(ring=ring, labels=labels, sig=sig, x=x, exact=exact, floor=floor, dirs=dirs)


def _sw_to_exact(setup, denoiser, cond):
    out = sampling.sample(denoiser, samplers.Euler(), setup["sig"], setup["x"], 5, cond)
    return out, np_sliced_wasserstein(out, setup["exact"], setup["dirs"])


def test_cfg_scale_one_samples_the_exact_conditional(ring_setup):
    s = ring_setup
    cond_out, sw_cond = _sw_to_exact(s, s["ring"], s["labels"])
    cfg_out, sw_cfg = _sw_to_exact(s, G.apply(s["ring"], G.classifier_free(1.0, UNCOND)), s["labels"])
    _, sw_uncond = _sw_to_exact(s, G.apply(s["ring"], G.classifier_free(0.0, UNCOND)), s["labels"])  # unconditional
    assert sw_cfg < 1.25 * s["floor"], (sw_cfg, s["floor"])
    assert sw_uncond > 2.0 * s["floor"], (sw_uncond, s["floor"])  # the check can tell the classes apart
    np.testing.assert_allclose(cfg_out, cond_out, atol=1e-3)  # same noise, same ODE: same samples


# ---- guidance rescale --------------------------------------------------------------------------

def _eps(x, x0, s):
    return (np.asarray(x, np.float64) - np.asarray(x0, np.float64)) / s


def _v(x, x0, s):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022) with abar = 1 / (1 + sigma^2)."""
    abar = 1.0 / (1.0 + s * s)
    return np.sqrt(abar) * _eps(x, x0, s) - np.sqrt(1 - abar) * np.asarray(x0, np.float64)


def np_rescale(cfg: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2024, eq. 15-16, with torch's unbiased std over non-batch axes."""
    axes = tuple(range(1, cfg.ndim))
    r = cfg * cond.std(axis=axes, ddof=1, keepdims=True) / cfg.std(axis=axes, ddof=1, keepdims=True)
    return phi * r + (1 - phi) * cfg


def _branches(mix, x, labels, sigma, scale):
    c = np_denoiser(mix, x, sigma, np.asarray(labels))
    u = np_denoiser(mix, x, sigma, None)
    return u + scale * (c - u), c


@pytest.mark.parametrize("space", ["epsilon", "v", "x0"])
def test_rescale_phi_zero_is_plain_cfg_and_phi_one_matches_cond_std(mix, batch, space):
    x, labels = batch
    s = 0.9
    plain = call(G.apply(mix, G.classifier_free(4.0, UNCOND)), x, s, labels)
    zero = call(G.apply(mix, G.classifier_free(4.0, UNCOND, rescale=0.0, rescale_space=space)), x, s, labels)
    np.testing.assert_allclose(zero, plain, atol=1e-6)
    one = call(G.apply(mix, G.classifier_free(4.0, UNCOND, rescale=1.0, rescale_space=space)), x, s, labels)
    cond = np.asarray(mix(x, s, labels))
    to = {"epsilon": lambda x0: _eps(x, x0, s), "v": lambda x0: _v(x, x0, s), "x0": lambda x0: np.asarray(x0)}[space]
    std = lambda u: u.reshape(u.shape[0], -1).std(axis=1)  # noqa: E731
    np.testing.assert_allclose(std(to(one)), std(to(cond)), rtol=1e-4)
    assert np.all(np.abs(std(to(plain)) - std(to(cond))) > 1e-3)  # plain CFG did not already match


@pytest.mark.parametrize("space", ["epsilon", "v"])
@pytest.mark.parametrize("phi", [0.3, 0.7])
def test_rescale_matches_numpy_rederivation(mix, batch, space, phi):
    """Rescale the network-output-space predictions in numpy, map back to x0 with the VP adapter's formula."""
    x, labels = batch
    s, scale = 1.3, 5.0
    x0_cfg, x0_c = _branches(mix, x, labels, s, scale)
    if space == "epsilon":
        eps = np_rescale(_eps(x, x0_cfg, s), _eps(x, x0_c, s), phi)
        want = np.asarray(vp_output_to_x0(jnp.asarray(eps, jnp.float32), x, jnp.full((6,), s), "epsilon"))
    else:
        v = np_rescale(_v(x, x0_cfg, s), _v(x, x0_c, s), phi)
        want = np.asarray(vp_output_to_x0(jnp.asarray(v, jnp.float32), x, jnp.full((6,), s), "v_prediction"))
    got = call(G.apply(mix, G.classifier_free(scale, UNCOND, rescale=phi, rescale_space=space)), x, s, labels)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_v_coefficients_invert_the_vp_adapter():
    """v = (x - (1 + s^2) x0) / (s sqrt(1 + s^2)) is what denoisers.vp_output_to_x0 inverts."""
    k = jax.random.split(jax.random.key(3), 2)
    x, x0 = jax.random.normal(k[0], (5, 3)), jax.random.normal(k[1], (5, 3))
    s = jnp.array([0.1, 0.5, 1.0, 3.0, 20.0])
    v = (x - (1 + s[:, None] ** 2) * x0) / (s[:, None] * jnp.sqrt(1 + s[:, None] ** 2))
    np.testing.assert_allclose(v, _v(x, x0, np.asarray(s)[:, None]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vp_output_to_x0(v, x, s, "v_prediction"), x0, atol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("space", ["epsilon", "v"])
def test_rescale_matches_diffusers_rescale_noise_cfg(mix, batch, space):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    x, labels = batch
    s, scale, phi = 0.6, 7.5, 0.7
    x0_cfg, x0_c = _branches(mix, x, labels, s, scale)
    to = _eps if space == "epsilon" else _v
    ref = rescale_noise_cfg(torch.tensor(to(x, x0_cfg, s)), torch.tensor(to(x, x0_c, s)), guidance_rescale=phi).numpy()
    got = call(G.apply(mix, G.classifier_free(scale, UNCOND, rescale=phi, rescale_space=space)), x, s, labels)
    np.testing.assert_allclose(to(x, got, s), ref, atol=2e-4 * max(1.0, np.abs(ref).max()))


# ---- classifier guidance -----------------------------------------------------------------------

@pytest.mark.parametrize("sigma", SIGMAS)
def test_classifier_guidance_is_bayes_rule(mix, batch, sigma):
    """D_u + sigma^2 grad log p(y | x) == D(x | y) for the exact class posterior (scale 1)."""
    x, labels = batch
    clf = mixtures.MixtureClassifier(mix)
    from_cond = call(G.apply(mix, G.bind(None), G.classifier_guidance(clf)), x, sigma, labels)
    from_leaf = call(G.apply(mix, G.classifier_guidance(clf, labels=labels)), x, sigma, None)
    want = np_denoiser(mix, x, sigma, np.asarray(labels))
    tol = 2e-5 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(from_cond, want, atol=tol)
    np.testing.assert_allclose(from_leaf, want, atol=tol)
    # scale 2 doubles the shift: D_u + 2 (D_c - D_u); a label of -1 leaves the sample unguided
    two = call(G.apply(mix, G.classifier_guidance(clf, 2.0, labels=labels.at[0].set(-1))), x, sigma, None)
    u = np_denoiser(mix, x, sigma, None)
    np.testing.assert_allclose(two[1:], (u + 2.0 * (want - u))[1:], atol=2 * tol)
    np.testing.assert_allclose(two[0], u[0], atol=tol)


@pytest.mark.parametrize("sigma", (0.4, 1.5))
def test_classifier_guidance_reads_labels_from_cond_and_calls_the_inner_denoiser_unconditionally(mix, batch, sigma):
    """The mixture denoiser is conditional when given labels: the guided result must still be D(x | y), not doubled."""
    x, labels = batch
    clf = mixtures.MixtureClassifier(mix)
    want_c, want_u = np_denoiser(mix, x, sigma, np.asarray(labels)), np_denoiser(mix, x, sigma, None)
    tol = 2e-5 * max(1.0, np.abs(want_c).max())
    np.testing.assert_allclose(call(G.apply(mix, G.classifier_guidance(clf)), x, sigma, labels), want_c, atol=tol)
    # ADM's guided conditional model, asked for explicitly: D_c + sigma^2 grad log p(y | x) = 2 D_c - D_u
    adm = call(G.apply(mix, G.classifier_guidance(clf, condition_inner=True)), x, sigma, labels)
    np.testing.assert_allclose(adm, 2 * want_c - want_u, atol=2 * tol)
    # labels given as a leaf: the runner's cond belongs to the inner denoiser
    flipped = 1 - labels
    leaf = call(G.apply(mix, G.classifier_guidance(clf, labels=labels)), x, sigma, flipped)
    want = np_denoiser(mix, x, sigma, np.asarray(flipped)) + (want_c - want_u)
    np.testing.assert_allclose(leaf, want, atol=2 * tol)
    with pytest.raises(ValueError, match="condition_inner=True passes the labels"):
        G.classifier_guidance(clf, labels=labels, condition_inner=True)


def test_classifier_guidance_rejects_conditioning_that_is_not_labels(mix, batch):
    x, labels = batch
    clf = mixtures.MixtureClassifier(mix)
    text = jnp.ones((x.shape[0], 3, 5))  # e.g. a prompt embedding meant for a conditional inner denoiser
    with pytest.raises(ValueError, match=r"labels must be integers of shape.*bind it first"):
        call(G.apply(mix, G.classifier_guidance(clf)), x, 0.5, text)
    # the documented fix: bind the inner denoiser's own conditioning, labels through cond
    seen = []

    @pytree_dataclass
    class Spy:
        inner: object

        def __call__(self, x_, s_, c_):
            seen.append(c_)
            return self.inner(x_, s_, None)

    out = call(G.apply(Spy(mix), G.bind(text), G.classifier_guidance(clf)), x, 0.5, labels)
    assert seen[-1].shape == text.shape
    np.testing.assert_allclose(out, np_denoiser(mix, x, 0.5, np.asarray(labels)), atol=5e-5)


def test_classifier_guidance_normalises_logits(mix, batch):
    x, labels = batch
    clf = mixtures.MixtureClassifier(mix)

    def logits(x_, s_):  # log-probs plus a per-sample offset that depends on x: same softmax
        return clf(x_, s_) + jnp.sum(x_.reshape(x_.shape[0], -1) ** 2, axis=1, keepdims=True)

    base = call(G.apply(mix, G.classifier_guidance(clf, labels=labels)), x, 0.5, None)
    norm = call(G.apply(mix, G.classifier_guidance(logits, labels=labels)), x, 0.5, None)
    raw = call(G.apply(mix, G.classifier_guidance(logits, labels=labels, normalize=False)), x, 0.5, None)
    np.testing.assert_allclose(norm, base, atol=1e-5)
    np.testing.assert_allclose(raw - base, 0.25 * 2.0 * np.asarray(x), atol=1e-4)  # sigma^2 grad |x|^2
    with pytest.raises(ValueError, match="labels"):
        call(G.apply(mix, G.classifier_guidance(clf)), x, 0.5, None)


def test_classifier_guidance_samples_the_exact_conditional(ring_setup):
    """Scale 1 with the exact posterior on the (label-accepting) mixture denoiser samples the exact class-1 ring."""
    s = ring_setup
    guided = G.apply(s["ring"], G.classifier_guidance(mixtures.MixtureClassifier(s["ring"])))
    out, sw = _sw_to_exact(s, guided, s["labels"])
    assert sw < 1.25 * s["floor"], (sw, s["floor"])


# ---- energy guidance ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gaussian():
    """A single Gaussian prior N(mu, v I) in 3-D: its denoiser's Jacobian is v / (v + sigma^2) I."""
    return mixtures.make_mixture([[0.5, -1.0, 2.0]], [0.8], [1.0])


def test_energy_guidance_closed_form_and_gradient_paths(gaussian):
    target, tau, scale, sigma = jnp.array([1.0, 1.0, -1.0]), 0.5, 1.7, 1.2
    x = 2.0 * jax.random.normal(jax.random.key(4), (5, 3))

    def loss(x0, cond):  # -log N(x0; target, tau^2) up to a constant
        return jnp.sum((x0 - target) ** 2, axis=1) / (2 * tau**2)

    through = call(G.apply(gaussian, G.energy_guidance(loss, scale)), x, sigma, None)
    direct = call(G.apply(gaussian, G.energy_guidance(loss, scale, through_denoiser=False)), x, sigma, None)
    d = np.asarray(gaussian(x, sigma))
    k = 0.64 / (0.64 + sigma**2)
    grad_x0 = (d - np.asarray(target)) / tau**2
    np.testing.assert_allclose(through, d - scale * sigma**2 * k * grad_x0, atol=1e-5)
    np.testing.assert_allclose(direct, d - scale * sigma**2 * grad_x0, atol=1e-5)
    assert np.abs(np.asarray(through) - np.asarray(direct)).max() > 0.1

    # each path equals an explicit jax.grad computation
    g_through = jax.grad(lambda x_: jnp.sum(loss(gaussian(x_, sigma), None)))(x)
    g_direct = jax.grad(lambda x0: jnp.sum(loss(x0, None)))(gaussian(x, sigma))
    np.testing.assert_allclose(through, d - scale * sigma**2 * np.asarray(g_through), atol=1e-5)
    np.testing.assert_allclose(direct, d - scale * sigma**2 * np.asarray(g_direct), atol=1e-5)


def test_energy_guidance_uses_cond_and_checks_loss_shape(gaussian):
    x = jax.random.normal(jax.random.key(5), (4, 3))
    targets = jnp.arange(12.0).reshape(4, 3)
    loss = lambda x0, cond: 0.5 * jnp.sum((x0 - cond) ** 2, axis=1)  # noqa: E731
    got = call(G.apply(gaussian, G.bind(None), G.energy_guidance(loss, 1.0, through_denoiser=False)), x, 0.3, targets)
    d = np.asarray(gaussian(x, 0.3))
    np.testing.assert_allclose(got, d - 0.09 * (d - np.asarray(targets)), atol=1e-5)
    with pytest.raises(ValueError, match="one loss per sample"):
        call(G.apply(gaussian, G.energy_guidance(lambda x0, c: x0 ** 2)), x, 0.3, None)


# ---- thresholding ------------------------------------------------------------------------------

@pytree_dataclass
class Fixed:
    """A 'denoiser' returning a fixed x0."""

    x0: jax.Array

    def __call__(self, x, sigma, cond=None):
        return self.x0


def test_static_threshold_against_numpy():
    x0 = 3.0 * jax.random.normal(jax.random.key(6), (4, 3, 3, 2))
    got = call(G.apply(Fixed(x0), G.static_threshold()), x0, 1.0, None)
    np.testing.assert_array_equal(got, np.clip(np.asarray(x0), -1, 1))
    got = call(G.apply(Fixed(x0), G.static_threshold(-0.5, 2.0)), x0, 1.0, None)
    np.testing.assert_array_equal(got, np.clip(np.asarray(x0), -0.5, 2.0))
    with pytest.raises(ValueError, match="low < high"):
        G.static_threshold(1.0, -1.0)


def np_dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    flat = np.abs(x0.reshape(x0.shape[0], -1)).astype(np.float64)
    s = np.clip(np.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


@pytest.mark.parametrize("ratio,max_value", [(0.995, np.inf), (0.9, 1.5), (0.5, 4.0)])
def test_dynamic_threshold_against_numpy(ratio, max_value):
    k = jax.random.split(jax.random.key(7), 2)
    x0 = jax.random.normal(k[0], (5, 4, 4, 3)) * jnp.array([0.2, 0.9, 1.5, 3.0, 8.0])[:, None, None, None]
    x0 = np.asarray(x0)
    want = np_dynamic_threshold(x0, ratio, max_value)
    got = call(G.apply(Fixed(x0), G.dynamic_threshold(ratio, max_value)), x0, 1.0, None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], x0[0])  # s < 1 everywhere: clipped to 1, nothing scaled
    assert np.abs(got).max() <= 1.0 + 1e-6


def test_dynamic_threshold_validation():
    with pytest.raises(ValueError, match="0.995, not 99.5"):
        G.dynamic_threshold(99.5)
    with pytest.raises(ValueError, match="max_value"):
        G.dynamic_threshold(0.9, 0.5)


@pytest.mark.parity
@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 1.5), (0.6, 3.0)])
def test_dynamic_threshold_matches_diffusers(ratio, max_value):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    x0 = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32) * np.float32([0.3, 1.0, 2.0, 5.0])[:, None, None, None]
    ref = sched._threshold_sample(torch.tensor(x0)).numpy()
    got = G.dynamic_threshold_values(jnp.asarray(x0), ratio, max_value)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---- composition, binding, pytrees -------------------------------------------------------------

def test_chain_order_matters(mix, batch):
    x, labels = batch
    cfg, clip = G.classifier_free(4.0, UNCOND), G.static_threshold(-0.5, 0.5)
    after = call(G.apply(mix, cfg, clip), x, 0.6, labels)  # clip(CFG(D))
    before = call(G.apply(mix, clip, cfg), x, 0.6, labels)  # CFG(clip(D)): extrapolation leaves the range
    assert np.abs(after).max() <= 0.5
    assert np.abs(before).max() > 0.6
    np.testing.assert_allclose(G.chain(cfg, clip)(mix)(x, 0.6, labels), after, atol=1e-6)
    with pytest.raises(TypeError, match="not callable"):
        G.chain(cfg, 3.0)
    c = np.clip(np_denoiser(mix, x, 0.6, np.asarray(labels)), -0.5, 0.5)
    u = np.clip(np_denoiser(mix, x, 0.6, None), -0.5, 0.5)
    np.testing.assert_allclose(before, u + 4.0 * (c - u), atol=1e-4)


def test_chain_skips_none_so_optional_transforms_compose(mix, batch):
    """What the recipes do with an optional threshold and an optional user transform (no separate helper)."""
    x, labels = batch
    cfg, clip = G.classifier_free(4.0, UNCOND), G.static_threshold(-0.5, 0.5)
    np.testing.assert_array_equal(G.chain(None, cfg, None, clip)(mix)(x, 0.6, labels),
                                  G.chain(cfg, clip)(mix)(x, 0.6, labels))
    assert G.chain(None, None)(mix) is mix and G.chain()(mix) is mix
    with pytest.raises(TypeError, match="transform 1 is not callable"):
        G.chain(None, 3.0)
    from jaxdiff.pipelines import stable_diffusion

    assert not hasattr(stable_diffusion, "combine_transforms")


def test_bind_ignores_runner_conditioning(mix, batch):
    x, labels = batch
    bound = G.apply(mix, G.bind(labels))
    np.testing.assert_array_equal(bound(x, 0.5, None), mix(x, 0.5, labels))
    np.testing.assert_array_equal(bound(x, 0.5, 1 - labels), mix(x, 0.5, labels))
    assert isinstance(bound, G.Bound)


def test_composed_transforms_are_pytrees_and_never_recompile(mix, batch):
    x, labels = batch
    make = lambda scale, phi, ratio: G.apply(  # noqa: E731
        mix, G.classifier_free(scale, UNCOND, rescale=phi), G.dynamic_threshold(ratio, 3.0))
    d = make(3.0, 0.5, 0.9)
    leaves, treedef = jax.tree_util.tree_flatten(d)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(again) is G.DynamicThreshold and type(again.inner) is G.ClassifierFree
    np.testing.assert_array_equal(again(x, 0.5, labels), d(x, 0.5, labels))
    t = G.chain(G.classifier_free(3.0, UNCOND), G.static_threshold())
    t_leaves, t_def = jax.tree_util.tree_flatten(t)
    assert len(t_leaves) == 5 and jax.tree_util.tree_unflatten(t_def, t_leaves)(mix)(x, 0.5, labels).shape == x.shape

    f = jax.jit(lambda den, x_, s_, c_: den(x_, s_, c_))
    for scale, phi, ratio in [(3.0, 0.5, 0.9), (7.5, 0.0, 0.99), (1.0, 1.0, 0.5)]:
        den = make(scale, phi, ratio)
        np.testing.assert_allclose(f(den, x, 0.5, labels), den(x, 0.5, labels), atol=1e-5)
    assert f._cache_size() == 1


@pytree_dataclass
class Shrink:
    """A toy conditional denoiser x0 = x / (2 + sigma^2) + cond (keeps the input dtype)."""

    def __call__(self, x, sigma, cond=None):
        s = jnp.asarray(sigma, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (2 + s * s) + cond.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)


def test_transforms_keep_bfloat16():
    x = jax.random.normal(jax.random.key(8), (3, 4, 4, 2), jnp.bfloat16)
    cond = jnp.array([0.5, -0.5, 2.0])
    clf = lambda x_, s_: jnp.stack([x_.mean(axis=(1, 2, 3)), -x_.mean(axis=(1, 2, 3))], 1)  # noqa: E731
    den = G.apply(Shrink(), G.classifier_free(3.0, jnp.zeros((1,)), rescale=0.5, rescale_space="v"),
                  G.energy_guidance(lambda x0, c: jnp.sum(x0**2, axis=(1, 2, 3)), through_denoiser=False),
                  G.classifier_guidance(clf, labels=jnp.array([0, 1, 0])), G.dynamic_threshold(0.9, 2.0))
    out = call(den, x, jnp.full((3,), 0.8, jnp.bfloat16), cond)
    ref = call(jax.tree_util.tree_map(lambda a: a, den), x.astype(jnp.float32), 0.8, cond)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)
