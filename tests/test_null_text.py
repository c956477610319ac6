"""Null-text inversion (Mokady et al. 2023): the per-step unconditional sampler, the pivot, the optimisation's effect,
what it may change, one compiled program (the tiny random SD's tokenizer, text encoder and VAE with a closed-form
Gaussian noise prediction in the U-Net's place), and DDIM inversion's round trip on digits-sd (a trained U-Net)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import conditioning
from jaxdiff import null_text as nt
from jaxdiff._pytree import pytree_dataclass

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
import _tiny_sd  # noqa: E402

STEPS = 3
PROMPTS = ["a b", "c d e"]
IMAGES = np.random.default_rng(0).uniform(0.0, 1.0, (2, 8, 8, 3)).astype(np.float32)
KW = dict(steps=STEPS, mesh=None, output="latent")


@pytree_dataclass
class GaussianEps:
    """The exact noise prediction of data ``x0 ~ N(mu(C), I)`` (per element) on the VP schedule, in the U-Net's place:
    ``E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu(C))`` with ``mu(C) = mean_tokens(C) @ proj``. A smooth model
    whose classifier-free guidance is exact for the mean ``mu_u + w (mu_c - mu_u)``, and whose unconditional mean
    the null-text embedding can move; it compiles in a moment (no U-Net)."""

    alphas_cumprod: jax.Array
    proj: jax.Array

    def __call__(self, x, t, ctx):
        steps = jnp.arange(self.alphas_cumprod.shape[0], dtype=t.dtype)
        a = jnp.interp(t, steps, self.alphas_cumprod)[:, None, None, None]
        mu = (jnp.mean(ctx, axis=1) @ self.proj)[:, None, None, :]
        return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * mu)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny random SD's tokenizer, text encoder and VAE around :class:`GaussianEps`."""
    tiny = _tiny_sd.build(tmp_path_factory.mktemp("tiny_null_text"))
    proj = jnp.asarray(np.random.default_rng(0).normal(0.0, 1.0, (8, 4)), jnp.float32)
    return dataclasses.replace(tiny, models=dataclasses.replace(tiny.models,
                                                                unet=GaussianEps(tiny.models.alphas_cumprod, proj)))


@pytest.fixture(scope="module")
def inverted(sd):
    return nt.invert(sd, IMAGES, PROMPTS, steps=STEPS, guidance=7.5)


def _image_latents(sd, inv):
    """z*_0 in VP scale: the VAE posterior mean, scaled (the pivot's last entry, checked below)."""
    return np.asarray(nt.image_latents(sd, IMAGES))


def _mse(a, b):
    return np.mean((np.asarray(a) - np.asarray(b)) ** 2, axis=(1, 2, 3))


def test_per_step_empty_embeddings_reproduce_plain_cfg_sampling(sd):
    """Every step's unconditional embedding = the empty prompt's: the SD recipe's own CFG run (to float rounding);
    a different embedding at one step of one image changes that image only."""
    lat = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
    req, _, static = sd.request(PROMPTS, steps=STEPS, sampler="ddim", guidance=7.5, latents=lat, height=8, width=8)
    plain = sd.run(req, nt.ddim_plan(sd, STEPS), static, latent=True, mesh=None)
    empty = np.asarray(sd.encode_prompt([""]))
    per_step = np.broadcast_to(empty[None], (2, STEPS) + empty.shape[1:]).copy()
    same = nt.reconstruct(sd, lat, PROMPTS, per_step, guidance=7.5, **KW)
    np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)
    per_step[1, 1] = np.asarray(sd.encode_prompt(["e"]))[0]
    moved = nt.reconstruct(sd, lat, PROMPTS, per_step, guidance=7.5, **KW)
    np.testing.assert_array_equal(moved[0], same[0])
    assert np.abs(moved[1] - plain[1]).max() > 1e-3


def test_context_transform_indexes_steps_and_halves():
    """The unconditional rows read embeddings[step - first] (shared or per image); the conditional rows keep theirs."""
    emb = jnp.arange(2 * 3 * 2 * 1, dtype=jnp.float32).reshape(2, 3, 2, 1)  # (B, S, L, D)
    net = nt.null_text_uncond(emb[0])(Echo())
    cond = {"context": -jnp.ones((4, 2, 1)), conditioning.CONDITIONAL: jnp.array([1.0, 1.0, 0.0, 0.0])}
    out = conditioning.at_step(net, 3, 1, 4)(jnp.zeros((4, 1)), jnp.zeros((4,)), cond)
    np.testing.assert_array_equal(out, np.stack([-np.ones((2, 1))] * 2 + [np.asarray(emb[0, 2])] * 2))
    net = nt.null_text_uncond(emb)(Echo())  # per image: a PerImage the SD recipe fills; outside it reads the array
    out = conditioning.at_step(net, 0, 0, 4)(jnp.zeros((4, 1)), jnp.zeros((4,)), cond)
    np.testing.assert_array_equal(out[2:], np.asarray(emb[:, 0]))


@pytree_dataclass
class Echo:
    """A network that returns the context it is given."""

    def __call__(self, x, t, cond):
        return cond["context"]


def test_pivot_runs_from_the_image_latent_to_sampling_invert(sd, inverted):
    """The pivot runs from the image latent z*_0 to jaxdiff.sampling.invert's result (w = 1, the prompt's embedding)."""
    x_t = nt.ddim_invert(sd, IMAGES, PROMPTS, steps=STEPS)
    np.testing.assert_allclose(x_t, inverted.latents, rtol=1e-5, atol=1e-5)
    final = float(nt.ddim_plan(sd, STEPS).sigmas.values[STEPS])  # the pivot is in VE coordinates
    np.testing.assert_allclose(inverted.pivot[:, -1] / np.sqrt(1 + final**2), _image_latents(sd, inverted), atol=1e-6)


def test_ddim_inversion_round_trips_at_guidance_one_on_digits_sd():
    """Real held-out digits on digits-sd: DDIM inversion then DDIM sampling at w = 1 returns the image latent to
    about 1% of its energy; the same start sampled at w = 7.5 (no null-text) lands far off (the paper's Fig. 2)."""
    from jaxdiff import builtin
    from jaxdiff.data.digits_text import load_digits_text

    digits = builtin.load_pipeline("digits-sd")
    held = load_digits_text()["held_out"]
    images, prompts = held["image"][:2], list(held["caption"][:2])
    z0 = np.asarray(nt.image_latents(digits, images))
    x_t = nt.ddim_invert(digits, images, prompts, steps=10)
    back = nt.reconstruct(digits, x_t, prompts, None, guidance=1.0, steps=10, mesh=None, output="latent")
    guided = nt.reconstruct(digits, x_t, prompts, None, guidance=7.5, steps=10, mesh=None, output="latent")
    assert np.all(_mse(back, z0) < 0.03 * np.mean(z0**2))
    assert np.all(_mse(guided, z0) > 5 * _mse(back, z0))


def test_null_text_lowers_the_loss_and_beats_ddim_inversion_at_cfg(sd, inverted):
    """At w = 7.5 the optimised embeddings lower every step's loss and reconstruct the image latent far better than
    plain DDIM inversion + CFG; sampling with them retraces the optimiser's trajectory (same final loss)."""
    z0 = _image_latents(sd, inverted)
    assert np.all(inverted.loss <= inverted.loss_before) and np.all(inverted.loss < inverted.loss_before).any()
    null = nt.reconstruct(sd, inverted.latents, PROMPTS, inverted.uncond, guidance=7.5, **KW)
    ddim = nt.reconstruct(sd, inverted.latents, PROMPTS, None, guidance=7.5, **KW)
    np.testing.assert_allclose(_mse(null, z0), inverted.loss[:, -1], rtol=1e-3)
    assert np.all(_mse(null, z0) < 0.5 * _mse(ddim, z0))


def test_only_the_unconditional_embedding_is_optimised(sd, inverted):
    """The start latent is the w = 1 inversion's whatever the guidance; at w = 1 the unconditional half has no
    effect, so its gradient is zero and the embeddings stay the empty prompt's exactly; early stop by threshold."""
    empty = np.asarray(sd.encode_prompt([""]))[0]
    at_one = nt.invert(sd, IMAGES, PROMPTS, steps=STEPS, guidance=1.0)
    np.testing.assert_array_equal(at_one.latents, inverted.latents)
    np.testing.assert_array_equal(at_one.uncond, np.broadcast_to(at_one.uncond[:, :1], at_one.uncond.shape))
    np.testing.assert_allclose(at_one.uncond[:, 0], np.broadcast_to(empty, (2,) + empty.shape), atol=1e-5)
    np.testing.assert_allclose(at_one.loss, at_one.loss_before, rtol=1e-6)  # same inputs, computed at two places
    assert np.abs(np.asarray(inverted.uncond) - empty).max() > 1e-3
    assert np.all(np.asarray(inverted.inner_steps) == 10)  # loss far above 1e-5 + 2e-5 i: all N steps
    lax = nt.invert(sd, IMAGES, PROMPTS, steps=STEPS, guidance=7.5, options=nt.NullTextOptions(epsilon=1e3))
    assert np.all(np.asarray(lax.inner_steps) == 1)  # below the threshold at once: one update, then stop


def test_one_compiled_program_for_other_images_prompts_and_settings(sd, inverted):
    before = nt.null_text_inversion_jit._cache_size()
    other = nt.invert(sd, IMAGES[::-1], PROMPTS[::-1], steps=STEPS, guidance=5.0,
                      options=nt.NullTextOptions(inner_steps=4, learning_rate=2e-2))
    assert nt.null_text_inversion_jit._cache_size() == before
    assert np.abs(np.asarray(other.latents) - np.asarray(inverted.latents)).max() > 1e-3
    assert np.all(np.asarray(other.inner_steps) <= 4)


def test_bad_embeddings_shape_is_refused():
    with pytest.raises(ValueError, match="steps, L, D"):
        nt.null_text_uncond(jnp.zeros((4, 8)))
