"""jaxdiff's Stable Diffusion pipeline equals diffusers' on the same tiny random folders, noise and scheduler."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _sd_folders as folders  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import MASKED_POSTERIOR_STREAM, POSTERIOR_STREAM  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a photo of a cat", "a red car on a hill"]
NEGATIVE = ["blurry", ""]
SEEDS = [3, 11]
TOL = 1e-3


@pytest.fixture(scope="module")
def eps_folder(tmp_path_factory):
    root = folders.save(folders.build_pipeline(), tmp_path_factory.mktemp("sd") / "eps")
    return root, StableDiffusion.from_pretrained(root)


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    root = folders.save(folders.build_pipeline(prediction="v_prediction", seed=1), tmp_path_factory.mktemp("sd") / "v")
    return root, StableDiffusion.from_pretrained(root)


def _reference(root, cls, scheduler):
    pipe = getattr(diffusers, cls).from_pretrained(str(root))
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, scheduler).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _posterior(enc, eps: np.ndarray):
    """diffusers' latent_dist.sample() with jaxdiff's standard-normal draw instead of torch's generator."""
    return enc.latent_dist.mean + enc.latent_dist.std * _nchw(eps)


def _nchw(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("case", [
    ("eps", "DDIMScheduler", "ddim", 4, 0.0),
    ("v", "DPMSolverMultistepScheduler", "dpmpp_2m", 5, 0.7),
])
def test_text_to_image_matches_diffusers(case, eps_folder, v_folder):
    kind, scheduler, sampler, steps, rescale = case
    root, sd = eps_folder if kind == "eps" else v_folder
    assert sd.models.prediction == ("epsilon" if kind == "eps" else "v_prediction")
    out = sd(PROMPTS, negative=NEGATIVE, steps=steps, sampler=sampler, guidance=7.5, rescale=rescale, seed=SEEDS,
             height=16, width=16)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)  # diffusers multiplies it by its init_noise_sigma
    ref = _reference(root, "StableDiffusionPipeline", scheduler)(
        prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
        guidance_rescale=rescale, height=16, width=16, latents=_nchw(noise), output_type="np").images
    assert out.shape == ref.shape == (2, 16, 16, 3)
    assert ref.std() > 0.02  # not a constant image
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    if kind != "eps":
        return
    # seeds, not batch positions, decide an image
    alone = sd(PROMPTS[1], negative=NEGATIVE[1], steps=steps, sampler=sampler, guidance=7.5, rescale=rescale,
               seed=[SEEDS[1]], height=16, width=16)
    np.testing.assert_allclose(alone[0], out[1], atol=1e-5, rtol=0)


def test_image_to_image_matches_diffusers(eps_folder, monkeypatch):
    root, sd = eps_folder
    image = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    steps, strength = 6, 0.6
    out = sd(PROMPTS, negative=NEGATIVE, steps=steps, sampler="euler", guidance=5.0, seed=SEEDS, image=image,
             strength=strength)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    eps = sd.initial_noise(SEEDS, 2, 16, 16, stream=POSTERIOR_STREAM)
    module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
    # diffusers draws the VAE posterior sample and the noise from torch's generator: give it jaxdiff's draws
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": _posterior(enc, eps))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))
    ref = _reference(root, "StableDiffusionImg2ImgPipeline", "EulerDiscreteScheduler")(
        prompt=PROMPTS, negative_prompt=NEGATIVE, image=image, strength=strength, num_inference_steps=steps,
        guidance_scale=5.0, output_type="np").images
    assert ref.std() > 0.02
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_inpainting_unet_matches_diffusers(tmp_path_factory, monkeypatch):
    from PIL import Image

    root = folders.save(folders.build_pipeline(in_channels=9, seed=2), tmp_path_factory.mktemp("sd") / "inpaint")
    sd = StableDiffusion.from_pretrained(root)
    assert sd.is_inpainting_model
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 6:] = 255
    out = sd(PROMPTS, negative=NEGATIVE, steps=4, sampler="ddim", guidance=6.0, seed=SEEDS, image=image,
             mask=mask / 255.0)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    eps = sd.initial_noise(SEEDS, 2, 16, 16, stream=MASKED_POSTERIOR_STREAM)
    module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": _posterior(enc, eps))
    ref = _reference(root, "StableDiffusionInpaintPipeline", "DDIMScheduler")(
        prompt=PROMPTS, negative_prompt=NEGATIVE, image=image, mask_image=Image.fromarray(mask), strength=1.0,
        num_inference_steps=4, guidance_scale=6.0, height=16, width=16, latents=_nchw(noise), output_type="np").images
    assert ref.std() > 0.02
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
