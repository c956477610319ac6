"""Semantic Diffusion Guidance against closed forms, an exact mixture and transformers' CLIP (torch)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance as G
from jaxdiff import mixtures, samplers, sampling, schedules
from jaxdiff import semantic_guidance as sg
from jaxdiff._pytree import pytree_dataclass
from jaxdiff._util import expand_to

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
import _tiny_sd  # noqa: E402


@jax.jit
def _call(den, x, sigma, cond):
    return den(x, sigma, cond)


def call(den, x, sigma, cond=None):
    """``den(x, sigma, cond)`` compiled once per denoiser structure (new leaf values reuse the program)."""
    return np.asarray(_call(den, jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32), cond))


# ---- a linear "CLIP": the cosine's gradient in closed form ----------------------------------------------

@pytree_dataclass
class LinearEncoder:
    """``images (B, ...) -> (flatten(images) @ W, ())``: a linear image tower."""

    w: jax.Array

    def __call__(self, images):
        return images.reshape(images.shape[0], -1) @ self.w, ()


@pytree_dataclass
class Identity:
    """A 'decoder' that hands x0 to the encoder unchanged."""

    def __call__(self, x0):
        return x0


def np_cos_grad(v: np.ndarray, w: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``d/dv (1 - cos(v W, t))`` for unit ``t``: ``-W (t / |e| - (e.t) e / |e|^3)``, e = v W."""
    e = v @ w
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return -(t / n - (e @ t.T) * e / n**3) @ w.T


def test_text_guidance_gradient_closed_form():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5))
    t = rng.normal(size=(1, 5))
    t /= np.linalg.norm(t)
    gaussian = mixtures.make_mixture([[0.2, -0.1, 0.3]], [0.5], [1.0])  # Jacobian of D: k I, k = v / (v + s^2)
    x = 0.4 * rng.normal(size=(4, 3))
    sigma, scale = 0.7, 2.5
    d = np.asarray(gaussian(jnp.asarray(x), sigma))
    k = 0.25 / (0.25 + sigma**2)
    # pixel route: x0 in [-1, 1] is read as the image x0 / 2 + 0.5 (inside (0, 1) here: no clipping)
    loss = sg.SemanticLoss(LinearEncoder(jnp.asarray(w, jnp.float32)), text=jnp.asarray(t, jnp.float32))
    g = np_cos_grad(d / 2 + 0.5, w, t) / 2
    direct = call(G.apply(gaussian, sg.semantic_guidance(loss, scale, through_denoiser=False)), x, sigma)
    np.testing.assert_allclose(direct, d - scale * sigma**2 * g, atol=1e-5)
    through = call(G.apply(gaussian, sg.semantic_guidance(loss, scale, through_denoiser=True)), x, sigma)
    np.testing.assert_allclose(through, d - scale * sigma**2 * k * g, atol=1e-5)
    # the loss itself: 1 - cosine
    e = (d / 2 + 0.5) @ w
    np.testing.assert_allclose(loss(jnp.asarray(d)), 1 - (e @ t.T)[:, 0] / np.linalg.norm(e, axis=1), atol=1e-6)


def test_normalized_gradient_and_sigma_window():
    rng = np.random.default_rng(5)
    w, t = rng.normal(size=(3, 5)), rng.normal(size=(1, 5))
    t /= np.linalg.norm(t)
    gaussian = mixtures.make_mixture([[0.2, -0.1, 0.3]], [0.5], [1.0])
    x, scale = 0.4 * rng.normal(size=(4, 3)), np.array([0.3, 0.5, 1.0, 2.0])
    loss = sg.SemanticLoss(LinearEncoder(jnp.asarray(w, jnp.float32)), text=jnp.asarray(t, jnp.float32))
    den = G.apply(gaussian, sg.semantic_guidance(loss, scale, through_denoiser=False, normalize=True,
                                                 sigma_min=0.5, sigma_max=1.0))
    for sigma in (0.7, 1.0):  # inside the window: x0 moves by scale * sigma along -g / rms(g)
        d = np.asarray(gaussian(jnp.asarray(x), sigma))
        g = np_cos_grad(d / 2 + 0.5, w, t) / 2
        want = d - (scale * sigma)[:, None] * g / np.sqrt(np.mean(g**2, axis=1, keepdims=True))
        np.testing.assert_allclose(call(den, x, sigma), want, atol=1e-5)
    for sigma in (0.3, 1.5):  # outside: the unguided x0 (to float32 rounding: two programs; inside it moves ~0.1)
        np.testing.assert_allclose(call(den, x, sigma), call(gaussian, x, sigma), rtol=1e-6, atol=1e-7)


def test_shifted_views_average_the_loss():
    rng = np.random.default_rng(6)
    img = rng.uniform(size=(2, 5, 4, 3))
    w, t = rng.normal(size=(60, 4)), rng.normal(size=(2, 4))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    shifts = ((0, 0), (2, -1), (-1, 1))

    def np_shift(a, dy, dx):  # edge-replicated translation: out[y, x] = a[clip(y - dy), clip(x - dx)]
        ys = np.clip(np.arange(a.shape[1]) - dy, 0, a.shape[1] - 1)
        xs = np.clip(np.arange(a.shape[2]) - dx, 0, a.shape[2] - 1)
        return a[:, ys][:, :, xs]

    def np_loss(a):
        e = a.reshape(2, -1) @ w
        return 1 - np.sum(e * t, axis=1) / np.linalg.norm(e, axis=1)

    loss = sg.SemanticLoss(LinearEncoder(jnp.asarray(w, jnp.float32)), text=jnp.asarray(t, jnp.float32),
                           decoder=Identity(), shifts=shifts)
    want = np.mean([np_loss(np_shift(img, *p)) for p in shifts], axis=0)
    np.testing.assert_allclose(loss(jnp.asarray(img, jnp.float32)), want, rtol=1e-5)
    assert not np.allclose(want, np_loss(img), rtol=1e-3)  # the views differ from the plain image


def test_contrastive_text_term_is_clip_cross_entropy():
    rng = np.random.default_rng(1)
    w, x0 = rng.normal(size=(4, 6)), rng.normal(size=(3, 4))
    t, c = rng.normal(size=(1, 6)), rng.normal(size=(2, 6))
    t, c = t / np.linalg.norm(t), c / np.linalg.norm(c, axis=1, keepdims=True)
    loss = sg.SemanticLoss(LinearEncoder(jnp.asarray(w, jnp.float32)), text=jnp.asarray(t, jnp.float32),
                           decoder=Identity(), contrast=jnp.asarray(c, jnp.float32), temperature=7.0)
    e = x0 @ w
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    logits = 7.0 * np.concatenate([e @ t.T, e @ c.T], axis=1)
    want = np.log(np.exp(logits).sum(1)) - logits[:, 0]
    np.testing.assert_allclose(loss(jnp.asarray(x0, jnp.float32)), want, rtol=1e-5)
    with_target = sg.SemanticLoss(loss.encoder, text=loss.text, decoder=Identity(), temperature=7.0,
                                  contrast=jnp.asarray(np.concatenate([c, t]), jnp.float32))
    np.testing.assert_allclose(with_target(jnp.asarray(x0, jnp.float32)), want, rtol=1e-5)  # the target counts once


# ---- an exact mixture: guidance toward one component raises its share ------------------------------------

def test_text_guidance_raises_the_preferred_components_share():
    mu = np.array([[1.5, 0.0, 0.5], [-1.5, 0.0, -0.5]])
    mix = mixtures.make_mixture(mu, 0.3, [1.0, 1.0])
    w = jnp.eye(3)  # "CLIP" = identity features: cosine with mu_0's direction prefers component 0
    t = jnp.asarray(mu[:1] / np.linalg.norm(mu[0]), jnp.float32)
    loss = sg.SemanticLoss(LinearEncoder(w), text=t, decoder=Identity())
    sig = schedules.karras(12, 0.01, 20.0, capacity=16)
    x = sampling.initial_noise(jax.random.key(3), (600, 3), 20.0)

    def share(scale):
        out = sampling.sample(G.apply(mix, sg.semantic_guidance(loss, scale, through_denoiser=False)), samplers.Euler(),
                              sig, x, 0)
        return float(np.mean(np.asarray(out)[:, 0] > 0))

    base, up, down = share(0.0), share(3.0), share(-3.0)
    assert 0.4 < base < 0.6, base
    assert up > 0.8, (base, up)       # fails if the loss's gradient sign were wrong
    assert down < 0.2, (base, down)


# ---- transformers' CLIP: parity of the embedding path and of the style statistics ---------------------------

MEAN, STD = (0.3, 0.5, 0.4), (0.2, 0.3, 0.25)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel (8x8 images, 4x4 patches, 2 vision layers) and its jaxdiff copy, with
    the tiny SD's tokenizer (7 ids)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxdiff.models.clip import CLIPModel

    text = dict(vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=4)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(config).eval()
    ours = CLIPModel.from_pretrained_tensors(config.to_dict(), {k: v.numpy() for k, v in ref.state_dict().items()})
    tok = _tiny_sd.tokenizer(tmp_path_factory.mktemp("sdg_tok"))
    guide = sg.Guide(ours, tok, sg.ImageProcessing(mean=MEAN, std=STD))
    return torch, ref, guide


def _torch_features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy().astype(np.float64)


def test_clip_losses_match_transformers(tiny_clip):
    torch, ref, guide = tiny_clip
    rng = np.random.default_rng(2)
    images, reference = rng.uniform(size=(3, 8, 8, 3)), rng.uniform(size=(1, 8, 8, 3))
    loss = guide.loss(text="a b", image=reference, style_weight=1.0, style_layers=(1, 2))
    got = {k: np.asarray(v) for k, v in jax.jit(lambda l, x: l.terms(x))(loss, jnp.asarray(images * 2 - 1,
                                                                                               jnp.float32)).items()}

    def pixels(x):  # transformers' CLIPImageProcessor (no resize / crop): (x - mean) / std, NCHW
        return torch.tensor(((x - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)

    ids = torch.tensor(np.asarray(guide.tokenizer(["a b"], padding="max_length", max_length=8)["input_ids"]))
    with torch.no_grad():
        t = _torch_features(ref.get_text_features(input_ids=ids))
        v = _torch_features(ref.get_image_features(pixel_values=pixels(images)))
        r = _torch_features(ref.get_image_features(pixel_values=pixels(reference)))
        hs = ref.vision_model(pixel_values=pixels(images), output_hidden_states=True).hidden_states
        hr = ref.vision_model(pixel_values=pixels(reference), output_hidden_states=True).hidden_states

    def cos(a, b):
        return (a @ b.T)[:, 0] / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    np.testing.assert_allclose(got["text"], 1 - cos(v, t), atol=1e-5)
    np.testing.assert_allclose(got["content"], 1 - cos(v, r), atol=1e-5)

    def gram(h):  # patch tokens (class token dropped), F^T F / N
        f = h.numpy().astype(np.float64)[:, 1:]
        return np.einsum("bnc,bnd->bcd", f, f) / f.shape[1]

    style = sum(np.mean((gram(hs[j]) - gram(hr[j])) ** 2, axis=(1, 2)) for j in (1, 2))
    np.testing.assert_allclose(got["style"], style, rtol=1e-4, atol=1e-7)
    assert np.all(style > 0)


def test_image_processing_matches_transformers_processor():
    transformers = pytest.importorskip("transformers")
    cfg = dict(do_resize=False, do_center_crop=True, crop_size={"height": 6, "width": 4}, do_rescale=True,
               rescale_factor=1 / 255, do_normalize=True, image_mean=list(MEAN), image_std=list(STD))
    images = np.random.default_rng(3).integers(0, 256, size=(2, 9, 8, 3)).astype(np.uint8)
    proc = transformers.CLIPImageProcessor(**cfg)
    want = np.asarray(proc(list(images), return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
    got = sg.image_processing(cfg)(jnp.asarray(images / 255.0, jnp.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert sg.image_processing(dict(cfg, do_resize=True, size={"shortest_edge": 6})).shortest_edge == 6


# ---- the recipe's latent route: scale 0 is the unguided denoiser exactly ------------------------------------

@pytree_dataclass
class Shrink:
    """A latent denoiser ``x0 = x / (1 + sigma^2)`` (the posterior mean of a unit Gaussian), cheap to compile."""

    def __call__(self, x, sigma, cond=None):
        return x / (1.0 + expand_to(jnp.asarray(sigma, x.dtype), x) ** 2)


def test_latent_guidance_through_the_sd_vae(tiny_clip, tmp_path):
    _, _, guide = tiny_clip
    sd = _tiny_sd.build(tmp_path)
    g = sg.Guide(guide.clip, guide.tokenizer, guide.processing, sg.LatentDecoder(sd.models))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4, 4, 4)) * 3.0, jnp.float32)  # 8x8 images
    refs = dict(text="a b", image=np.full((8, 8, 3), 0.5), style_weight=1.0)
    # gradient w.r.t. x0_hat only (the chain rule through the denoiser is checked above): through the VAE decoder
    guided = G.apply(Shrink(), g.guidance(0.0, through_denoiser=False, **refs))
    plain = np.asarray(Shrink()(x, 3.0))
    np.testing.assert_array_equal(call(guided, x, 3.0), plain)
    on = call(dataclasses.replace(guided, scale=jnp.float32(50.0)), x, 3.0)  # the same program
    assert np.abs(on - plain).max() > 1e-3  # the decoded latents' gradient reaches the denoiser's output
    with pytest.raises(ValueError, match="needs a reference"):
        g.loss()
