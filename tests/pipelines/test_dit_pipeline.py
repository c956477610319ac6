"""DiTPipeline against diffusers' DiTPipeline on a tiny random DiT + VAE (same start latents), both guidance modes."""
from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.pipelines.dit import DiTPipeline

LABELS = [3, 997]
STEPS, SCALE = 4, 4.0


def _perturb(model, seed: int):
    """Noise on every parameter, so zero-initialised pieces (adaLN, biases) are exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # learned sigma (out_channels = 2 x 4); 1000 classes: diffusers' pipeline hard-codes the null class 1000
    transformer = _perturb(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000), 1)
    vae = _perturb(diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                                           layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2), 2)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("dit") / "pipe"
    pipe.save_pretrained(str(root), safe_serialization=True)
    return root, pipe, DiTPipeline.from_pretrained(root)


def _start(pipe, seed: int):
    """The latents diffusers' pipeline draws from ``torch.Generator().manual_seed(seed)`` (NCHW)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    c, s = pipe.transformer.config.in_channels, pipe.transformer.config.sample_size
    return randn_tensor((len(LABELS), c, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _original_cfg_loop(pipe, latents):
    """facebookresearch/DiT's forward_with_cfg (guidance on model_out[:, :3]) inside diffusers' scheduler loop."""
    import torch

    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    n, c = len(LABELS), pipe.transformer.config.in_channels
    y = torch.tensor(LABELS + [1000] * n)
    x = latents
    with torch.no_grad():
        for t in sched.timesteps:
            out = pipe.transformer(torch.cat([x, x]), timestep=t.expand(2 * n), class_labels=y).sample
            eps, rest = out[:, :3], out[:, 3:]
            cond_eps, uncond_eps = torch.split(eps, n, dim=0)
            eps = uncond_eps + SCALE * (cond_eps - uncond_eps)
            model_out = torch.cat([eps, rest[:n]], dim=1)[:, :c]  # channel 3: the conditional prediction
            x = sched.step(model_out, t, x).prev_sample
        img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parity
def test_dit_pipeline_matches_diffusers_and_the_original_guidance(folder):
    import torch

    root, pipe, ours = folder
    ref = pipe(class_labels=LABELS, guidance_scale=SCALE, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    latents = _start(pipe, 0)
    got = ours(LABELS, steps=STEPS, guidance=SCALE, latents=latents)
    assert got.shape == (2, 16, 16, 3) and ref.std() > 0.02
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    # the original code's guidance (first three channels): a different image, equal to the hand-written loop
    orig = ours(LABELS, steps=STEPS, guidance=SCALE, latents=latents, guided_channels=3)
    np.testing.assert_allclose(orig, _original_cfg_loop(pipe, latents), atol=1e-3, rtol=0)
    assert np.abs(orig - ref).max() > 1e-2


def test_dit_pipeline_bad_input(folder):
    _, _, ours = folder
    with pytest.raises(ValueError, match="outside"):
        ours([1001], steps=2)
    with pytest.raises(ValueError, match="guided_channels"):
        ours([1], steps=2, guided_channels=5)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours([1, 2], steps=2, latents=np.zeros((1, 8, 8, 4), np.float32))


def test_channel_guidance_is_the_hand_formula_and_all_ones_is_classifier_free():
    import jax
    import jax.numpy as jnp

    from jaxdiff import guidance as G
    from jaxdiff.pipelines.dit import ChannelClassifierFree, guided_mask

    table = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)  # per class and channel

    def toy(t, x, sigma, y):  # D(x, sigma, y) = x * t[y] + sigma, channel by channel
        return x * t[y][:, None, None, :] + sigma[:, None, None, None]

    inner = jax.tree_util.Partial(toy, table)
    x, sigma, y, null = jnp.ones((2, 2, 2, 4)), jnp.array([0.5, 2.0]), jnp.array([0, 1]), jnp.full((2,), 3)
    c, u = inner(x, sigma, y), inner(x, sigma, null)
    got = ChannelClassifierFree(inner, 4.0, null, guided_mask(4, 3))(x, sigma, y)
    want = np.asarray(c).copy()
    want[..., :3] = np.asarray(u + 4.0 * (c - u))[..., :3]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(ChannelClassifierFree(inner, 4.0, null, guided_mask(4))(x, sigma, y),
                               G.ClassifierFree(inner, 4.0, null)(x, sigma, y), rtol=1e-6)
