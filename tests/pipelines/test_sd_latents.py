"""User start latents (diffusers' ``latents=``): the same images as diffusers, checked shapes, no recompilation.
(Their split over two devices with the rest of the batch: tests/test_cpu_devices.py, which owns the two-device run.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdiff.pipelines import StableDiffusion

PROMPTS = ["a photo of a cat", "a red car on a hill"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def eps_folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import _sd_folders as folders

    root = folders.save(folders.build_pipeline(), tmp_path_factory.mktemp("sd") / "eps")
    return root, StableDiffusion.from_pretrained(root)


@pytest.mark.parity
@pytest.mark.parametrize("scheduler,sampler", [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim")])
def test_latents_match_diffusers(scheduler, sampler, eps_folder):
    import diffusers
    import torch

    root, sd = eps_folder
    h = 16 // sd.models.vae_factor
    latents = np.random.default_rng(5).standard_normal((2, h, h, 4)).astype(np.float32)  # NHWC
    nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
    kw = dict(negative=NEGATIVE, steps=4, sampler=sampler, guidance=7.5, height=16, width=16)
    out = sd(PROMPTS, latents=latents, seed=[3, 11], **kw)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(root))
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, scheduler).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=16,
               width=16, latents=nchw, output_type="np").images
    assert ref.std() > 0.02
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)
    # diffusers' own NCHW tensor is read as such, and the seeds no longer choose the start (deterministic sampler)
    np.testing.assert_allclose(sd(PROMPTS, latents=nchw, seed=[0, 1], **kw), out, atol=1e-5, rtol=0)


def test_latents_shape_and_mode_errors(tiny_sd):
    base = dict(height=8, width=8, steps=2, output="latent")
    f, c = tiny_sd.models.vae_factor, tiny_sd.models.latent_channels
    good = (2, 8 // f, 8 // f, c)
    with pytest.raises(ValueError, match=r"latents must have shape .*\(2, 4, 4, \d+\).*got \(1, 4, 4, \d+\)"):
        tiny_sd(["a", "b"], latents=np.zeros((1,) + good[1:], np.float32), **base)
    with pytest.raises(ValueError, match="latents must have shape"):
        tiny_sd(["a", "b"], latents=np.zeros((2, 8, 8, c), np.float32), **base)
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny_sd(["a", "b"], latents=np.full(good, np.nan, np.float32), **base)
    with pytest.raises(ValueError, match="latents= applies to text-to-image"):
        tiny_sd(["a", "b"], latents=np.zeros(good, np.float32), image=np.full((8, 8, 3), 0.5, np.float32), **base)


def test_latents_values_do_not_recompile_and_replace_the_seeds(tiny_sd):
    from jaxdiff.pipelines.stable_diffusion import generate_latents_jit

    f, c = tiny_sd.models.vae_factor, tiny_sd.models.latent_channels
    rng = np.random.default_rng(0)
    lat = [rng.standard_normal((2, 16 // f, 16 // f, c)).astype(np.float32) for _ in range(3)]
    # 16 px (test_compile_count runs 8 px in the same session and counts its own compilations)
    base = dict(negative="", height=16, width=16, steps=3, sampler="dpmpp_2m", guidance=7.5, output="latent")
    first = tiny_sd(["a b", "c"], latents=lat[0], seed=0, **base)
    size = generate_latents_jit._cache_size()
    outs = [tiny_sd(["a b", "c"], latents=x, seed=0, **base) for x in lat[1:]]
    same = tiny_sd(["a b", "c"], latents=lat[0], seed=[7, 8], **base)
    assert generate_latents_jit._cache_size() == size  # new latents and seeds: the same program
    assert min(np.abs(first - o).max() for o in outs) > 1e-4  # the latents decide the image
    np.testing.assert_allclose(same, first, atol=1e-6, rtol=0)  # the seeds do not (deterministic sampler)
    # the start is latents * init_sigma, exactly as with the seeds' own noise
    noise = tiny_sd.initial_noise([4, 9], 2, 16, 16)
    seeded = tiny_sd(["a b", "c"], seed=[4, 9], **base)
    np.testing.assert_allclose(tiny_sd(["a b", "c"], latents=noise, seed=0, **base), seeded,
                               atol=4e-6 * np.abs(seeded).max(), rtol=0)  # float32 rounding of O(30) latents, 7.5x CFG

