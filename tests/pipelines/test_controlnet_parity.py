"""ControlNet in jaxdiff's SD recipe equals diffusers' ControlNet pipelines on tiny random components.

Two ControlNets with different scales and active intervals, guess mode, image-to-image (whose interval counts
only the steps that run) and the 9-channel inpainting U-Net, all given the same start noise and posterior draws.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _sd_folders as folders  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402
from jaxdiff.pipelines.controlnet import controlnet_transform  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import MASKED_POSTERIOR_STREAM, POSTERIOR_STREAM  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a photo of a cat", "a red car on a hill"]
NEGATIVE = ["blurry", ""]
SEEDS = [3, 11]
TOL = 1e-3
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def _torch_controlnet(seed: int):
    """A diffusers ControlNetModel for the tiny U-Net of _sd_folders (4 latent channels, 2x control downscale),
    its zero-initialised convolutions drawn at random so that the control shows."""
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=folders.TEXT_DIM, attention_head_dim=4, conditioning_embedding_out_channels=(4, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(ZERO_INIT):
                p.normal_(0.0, 0.3)
    return cn.to(torch.float32).eval()


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """(folder, jaxdiff SD, [(torch ControlNet, jaxdiff folder path)] * 2), plus the 9-channel inpainting folder."""
    base = tmp_path_factory.mktemp("cn")
    root = folders.save(folders.build_pipeline(), base / "sd")
    nets = []
    for k in range(2):
        cn = _torch_controlnet(10 + k)
        cn.save_pretrained(str(base / f"cn{k}"), safe_serialization=True)
        nets.append((cn, base / f"cn{k}"))
    return root, StableDiffusion.from_pretrained(root), nets


def _reference(root, cls, scheduler, controlnet):
    base = diffusers.DiffusionPipeline.from_pretrained(str(root))
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe = getattr(diffusers, cls)(**parts, controlnet=controlnet, scheduler=getattr(diffusers, scheduler).from_config(
        config), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _nchw(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _posterior(enc, eps: np.ndarray):
    return enc.latent_dist.mean + enc.latent_dist.std * _nchw(eps)


def _control_images():
    """A 20x20 PIL image (Lanczos-resized to 16x16 by both) and a (1, 8, 8, 3) float array (nearest-resized;
    diffusers would read a 3-d array's first axis as the batch)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    pil = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    arr = rng.uniform(0.0, 1.0, (1, 8, 8, 3)).astype(np.float32)
    return pil, arr


def _assert_matches(out, ref, plain):
    """``plain``: diffusers at conditioning scale 0 (the same pipeline without control)."""
    assert out.shape == ref.shape
    assert ref.std() > 0.02  # not a constant image
    assert np.abs(ref - plain).max() > 20 * TOL  # the control changes the image well beyond the tolerance
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_two_controlnets_with_their_own_scales_and_intervals_match_diffusers(components):
    root, sd, nets = components
    images = list(_control_images())
    kw = dict(negative=NEGATIVE, steps=5, sampler="dpmpp_2m", guidance=7.5, seed=SEEDS, height=16, width=16, mesh=None)
    scale, start, end = [0.9, 0.6], [0.0, 0.4], [0.6, 1.0]  # net 0 on steps 0-2, net 1 on steps 2-4
    cn = controlnet_transform(sd, [p for _, p in nets], images, height=16, width=16, scale=scale, start=start, end=end)
    out = sd(PROMPTS, network_transform=cn, **kw)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    pipe = _reference(root, "StableDiffusionControlNetPipeline", "DPMSolverMultistepScheduler", [n for n, _ in nets])
    ref, plain = (pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=images, num_inference_steps=5,
                       guidance_scale=7.5, height=16, width=16, latents=_nchw(noise), controlnet_conditioning_scale=s,
                       control_guidance_start=start, control_guidance_end=end, output_type="np").images
                  for s in (scale, [0.0, 0.0]))
    _assert_matches(out, ref, plain)
    # each interval matters: both nets always on is another image
    always = sd(PROMPTS, network_transform=controlnet_transform(sd, [p for _, p in nets], images, height=16, width=16,
                                                                 scale=scale), **kw)
    assert np.abs(always - out).max() > 20 * TOL


def test_guess_mode_matches_diffusers(components):
    root, sd, nets = components
    pil, _ = _control_images()
    kw = dict(negative=NEGATIVE, steps=4, sampler="ddim", guidance=6.0, seed=SEEDS, height=16, width=16, mesh=None)
    cn = controlnet_transform(sd, nets[0][1], pil, height=16, width=16, scale=0.8, guess_mode=True)
    out = sd(PROMPTS, network_transform=cn, **kw)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    pipe = _reference(root, "StableDiffusionControlNetPipeline", "DDIMScheduler", nets[0][0])
    ref, plain, normal = (pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=pil, num_inference_steps=4,
                               guidance_scale=6.0, height=16, width=16, latents=_nchw(noise),
                               controlnet_conditioning_scale=s, guess_mode=g, output_type="np").images
                          for s, g in ((0.8, True), (0.0, True), (0.8, False)))
    _assert_matches(out, ref, plain)
    assert np.abs(normal - out).max() > 20 * TOL  # guess mode is not the plain control


def test_one_control_image_per_prompt_matches_diffusers(components):
    """A batch of control images gives prompt i image i (diffusers' batched ``image=``), in one compiled call."""
    from PIL import Image

    root, sd, nets = components
    rng = np.random.default_rng(9)
    pils = [Image.fromarray(rng.integers(lo, lo + 64, (16, 16, 3), dtype=np.uint8)) for lo in (0, 192)]  # dark, light
    kw = dict(negative=NEGATIVE, steps=3, sampler="ddim", guidance=5.0, seed=SEEDS, height=16, width=16, mesh=None)
    out = sd(PROMPTS, network_transform=controlnet_transform(sd, nets[0][1], pils, height=16, width=16), **kw)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    pipe = _reference(root, "StableDiffusionControlNetPipeline", "DDIMScheduler", nets[0][0])
    ref, plain = (pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=pils, num_inference_steps=3, guidance_scale=5.0,
                       height=16, width=16, latents=_nchw(noise), controlnet_conditioning_scale=s,
                       output_type="np").images for s in (1.0, 0.0))
    _assert_matches(out, ref, plain)
    # prompt 0 read image 0: the call with image 0 shared by both prompts agrees on prompt 0 only
    shared = sd(PROMPTS, network_transform=controlnet_transform(sd, nets[0][1], pils[0], height=16, width=16), **kw)
    assert np.abs(shared[0] - out[0]).max() < 1e-5 < 2e-3 < np.abs(shared[1] - out[1]).max()


def test_image_to_image_interval_counts_the_steps_that_run(components, monkeypatch):
    root, sd, nets = components
    pil, _ = _control_images()
    image = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    steps, strength = 6, 0.6  # 3 steps run; the interval [0.3, 1] skips the first of them
    kw = dict(negative=NEGATIVE, steps=steps, sampler="euler", guidance=5.0, seed=SEEDS, image=image,
              strength=strength, mesh=None)
    cn = controlnet_transform(sd, nets[1][1], pil, height=16, width=16, scale=1.2, start=0.3, end=1.0)
    out = sd(PROMPTS, network_transform=cn, **kw)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    eps = sd.initial_noise(SEEDS, 2, 16, 16, stream=POSTERIOR_STREAM)
    module = diffusers.pipelines.controlnet.pipeline_controlnet_img2img
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": _posterior(enc, eps))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))
    pipe = _reference(root, "StableDiffusionControlNetImg2ImgPipeline", "EulerDiscreteScheduler", nets[1][0])
    ref, plain, absolute = (pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=image, control_image=pil,
                                 strength=strength, height=16, width=16, num_inference_steps=steps, guidance_scale=5.0,
                                 controlnet_conditioning_scale=s, control_guidance_start=a,
                                 control_guidance_end=1.0, output_type="np").images
                            for s, a in ((1.2, 0.3), (0.0, 0.3), (1.2, 0.0)))
    _assert_matches(out, ref, plain)
    assert np.abs(absolute - out).max() > 20 * TOL  # counting all 6 steps would keep the control on every step


def test_inpainting_unet_with_controlnet_matches_diffusers(components, tmp_path_factory, monkeypatch):
    from PIL import Image

    _, _, nets = components
    root = folders.save(folders.build_pipeline(in_channels=9, seed=2), tmp_path_factory.mktemp("cn") / "inpaint")
    sd = StableDiffusion.from_pretrained(root)
    _, arr = _control_images()
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 6:] = 255
    kw = dict(negative=NEGATIVE, steps=4, sampler="ddim", guidance=6.0, seed=SEEDS, image=image, mask=mask / 255.0,
              mesh=None)
    cn = controlnet_transform(sd, nets[0][1], arr, height=16, width=16, scale=0.7, start=0.0, end=0.5)
    out = sd(PROMPTS, network_transform=cn, **kw)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    eps = sd.initial_noise(SEEDS, 2, 16, 16, stream=MASKED_POSTERIOR_STREAM)
    module = diffusers.pipelines.controlnet.pipeline_controlnet_inpaint
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": _posterior(enc, eps))
    pipe = _reference(root, "StableDiffusionControlNetInpaintPipeline", "DDIMScheduler", nets[0][0])
    ref, plain = (pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=image, mask_image=Image.fromarray(mask),
                       control_image=arr, strength=1.0, num_inference_steps=4, guidance_scale=6.0, height=16, width=16,
                       latents=_nchw(noise), controlnet_conditioning_scale=s, control_guidance_start=0.0,
                       control_guidance_end=0.5, output_type="np").images for s in (0.7, 0.0))
    _assert_matches(out, ref, plain)
