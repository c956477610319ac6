"""T2I-Adapter in the SD recipe: diffusers' StableDiffusionAdapterPipeline on the same tiny random folders (full,
light, MultiAdapter with weights); new scales and control images compile nothing (counted on the parity folder,
whose programs the parity cases compile anyway); scale 0 is the plain image; bad control images."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.folders import load_model_folder
from jaxdiff.models import t2i_adapter as T
from jaxdiff.pipelines import StableDiffusion
from jaxdiff.pipelines import stable_diffusion as S

PROMPTS = ["a photo of a cat", "a red car on a hill"]
NEGATIVE = ["blurry", ""]
SEEDS = [3, 11]
TOL = 1e-3
# adapters for the 3-block U-Net below (8, 16, 16 channels; VAE factor 2, so 16 px -> 8x8 latents -> 8, 4, 2)
ADAPTERS = {"full": dict(channels=[8, 16, 16], num_res_blocks=1, downscale_factor=2, adapter_type="full_adapter"),
            "light": dict(channels=[8, 16], num_res_blocks=2, downscale_factor=2, adapter_type="light_adapter")}


def _nchw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import _sd_folders as folders

    root = folders.save(folders.build_pipeline(blocks=(8, 16, 16), seed=5), tmp_path_factory.mktemp("sd") / "sd")
    return root, StableDiffusion.from_pretrained(root)


def _adapter(kind: str, seed: int, folder):
    """A random diffusers adapter (weights doubled so its features matter), saved and loaded as a folder."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    ref = diffusers.T2IAdapter(in_channels=3, **ADAPTERS[kind]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(2.0)
    ref.save_pretrained(str(folder), safe_serialization=True)
    return ref, load_model_folder(folder)


def _reference(root, adapter):
    import diffusers

    base = diffusers.StableDiffusionPipeline.from_pretrained(str(root))
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe = diffusers.StableDiffusionAdapterPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, adapter=adapter,
        scheduler=diffusers.DDIMScheduler.from_config(config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["full", "light", "multi"])
def test_adapter_pipeline_matches_diffusers(kind, sd_folder, tmp_path):
    root, sd = sd_folder
    rng = np.random.default_rng(7)
    if kind == "multi":
        pairs = [_adapter(k, s, tmp_path / k) for k, s in (("full", 1), ("light", 2))]
        images = [rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32) for _ in pairs]
        scale = [0.8, 0.5]  # diffusers' adapter_conditioning_scale is MultiAdapter's adapter_weights
        net = T.t2i_adapter([m for _, m in pairs], images, scale)
        ref_adapter = [r for r, _ in pairs]
        ref_image = [_nchw(np.repeat(im, 2, 0)) for im in images]  # diffusers wants one per prompt
    else:
        ref_adapter, model = _adapter(kind, 1, tmp_path / kind)
        image = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
        scale = 0.8
        net = T.t2i_adapter(model, image, scale)
        ref_image = _nchw(np.repeat(image, 2, 0))
    kw = dict(negative=NEGATIVE, steps=4, sampler="ddim", guidance=7.5, seed=SEEDS, height=16, width=16)
    out = sd(PROMPTS, network_transform=net, **kw)
    plain = sd(PROMPTS, **kw)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)  # diffusers multiplies it by its init_noise_sigma
    ref = _reference(root, ref_adapter)(
        prompt=PROMPTS, negative_prompt=NEGATIVE, image=ref_image, num_inference_steps=4, guidance_scale=7.5,
        height=16, width=16, latents=_nchw(noise), adapter_conditioning_scale=scale, output_type="np").images
    assert ref.shape == out.shape == (2, 16, 16, 3)
    assert np.abs(ref - plain).max() > 0.02  # the adapter visibly changes the image
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    if kind == "full":
        _check_runtime_values(sd, model, image, plain, out, kw)


def _check_runtime_values(sd, model, image, plain, out, kw):
    """New scales and control images reuse the program; scale 0 is the plain image; the features are computed
    once, outside the sampling loop (the transform holds them and its scale, not the adapter)."""
    net = T.t2i_adapter(model, image, 0.0)
    assert [tuple(v.shape) for v in jax.tree_util.tree_leaves(net)] == [(), (1, 8, 8, 8), (1, 4, 4, 16), (1, 2, 2, 16)]
    size = S.generate_jit._cache_size()
    zero = sd(PROMPTS, network_transform=net, **kw)
    other = np.random.default_rng(8).uniform(0, 1, image.shape).astype(np.float32)
    outs = [sd(PROMPTS, network_transform=T.t2i_adapter(model, im, s), **kw) for im, s in ((image, 2.0), (other, 2.0))]
    assert S.generate_jit._cache_size() == size
    np.testing.assert_allclose(zero, plain, atol=1e-5, rtol=0)
    for a, b in zip([out] + outs, outs):
        assert np.abs(a - b).max() > 1e-3


def _tiny_adapter():
    """A full adapter for tiny_sd's one-block U-Net (8 channels, 4x4 latents of 8x8 images; no torch)."""
    return T.T2IAdapter(T.T2IAdapterConfig(channels=(8,), num_res_blocks=1, downscale_factor=2), rngs=nnx.Rngs(0))


KW = dict(negative="c", steps=3, sampler="dpmpp_2m", seed=[3, 4], guidance=4.0, height=8, width=8, output="latent",
          mesh=None)


def test_bad_control_image_is_one_clear_error(tiny_sd):
    adapter = _tiny_adapter()
    with pytest.raises(ValueError, match=r"control image of the generated image's size \(8x8 pixels\)"):
        tiny_sd(["a b", "d"], network_transform=T.t2i_adapter(adapter, np.zeros((1, 16, 16, 3), np.float32)), **KW)
    with pytest.raises(ValueError, match=r"3 channel\(s\) \(in_channels\)"):
        T.t2i_adapter(adapter, np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="one control image per adapter"):
        T.t2i_adapter([adapter, adapter], [np.zeros((1, 8, 8, 3), np.float32)])
    two = T.t2i_adapter(adapter, np.zeros((2, 8, 8, 3), np.float32))  # one each would be silently mixed up
    with pytest.raises(ValueError, match=r"one control image per prompt build the transform with .*per_image=True"):
        tiny_sd(["a b", "d"], network_transform=two, **KW)
    three = T.t2i_adapter(adapter, np.zeros((3, 8, 8, 3), np.float32), per_image=True)
    with pytest.raises(ValueError, match="has 3 entries for 2 prompts: give one control image per prompt"):
        tiny_sd(["a b", "d"], network_transform=three, **KW)


def test_per_image_control_images_give_prompt_i_image_i(tiny_sd):
    """per_image=True: prompt i reads control image i, exactly as a call with image i shared by every prompt."""
    adapter = _tiny_adapter()
    images = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    per = tiny_sd(["a b", "d"], network_transform=T.t2i_adapter(adapter, images, 2.0, per_image=True), **KW)
    for i in range(2):
        shared = tiny_sd(["a b", "d"], network_transform=T.t2i_adapter(adapter, images[i:i + 1], 2.0), **KW)
        np.testing.assert_allclose(per[i], shared[i], atol=1e-5)
        assert np.abs(per[1 - i] - shared[1 - i]).max() > 1e-3
