"""Depth-to-image equals diffusers' StableDiffusionDepth2ImgPipeline on a tiny random SD 2 depth folder (5-channel
U-Net, a tiny DPT-Hybrid), given the same start noise and posterior draws; one compiled program; bad inputs refused.

One full generation is compiled (the DPT-estimated branch, which runs every stage); the user-depth branch differs
from it only in where the raw depth comes from, so its depth channel is compared with diffusers' directly.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import _sd_folders as folders  # noqa: E402
from jaxdiff.pipelines import depth2img  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import POSTERIOR_STREAM  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a photo of a cat", "a red car on a hill"]
NEGATIVE = ["blurry", ""]
SEEDS = [3, 11]
TOL = 1e-3
RUN = dict(negative=NEGATIVE, steps=4, sampler="ddim", guidance=6.0, seed=SEEDS)


def _tiny_dpt():
    """A tiny DPT-Hybrid (BiT bottleneck backbone + ViT), weights perturbed off their zero / one inits."""
    bit = dict(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], embedding_dynamic_padding=True,
               out_features=["stage1", "stage2", "stage3"], hidden_sizes=[8, 16, 32], num_groups=2, embedding_size=8)
    config = transformers.DPTConfig(
        image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=4, backbone_out_indices=(0, 1, 2, 3),
        num_attention_heads=2, intermediate_size=20, is_hybrid=True, backbone_config=bit,
        backbone_featmap_shape=[1, 32, 2, 2], neck_hidden_sizes=[8, 16, 16, 16], reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=16)
    torch.manual_seed(0)
    model = transformers.DPTForDepthEstimation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    """(folder, diffusers pipeline on DDIM, jaxdiff pipeline): 16x16 images, 8x8 latents, DPT at 32x32."""
    base = folders.build_pipeline(in_channels=5)
    proc = transformers.DPTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, depth_estimator=_tiny_dpt(), feature_extractor=proc)
    root = folders.save(pipe, tmp_path_factory.mktemp("depth") / "sd2-depth")
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return root, pipe, depth2img.load(root)


def _nchw(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _images(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in PROMPTS]


def _same_draws(monkeypatch, sd):
    """diffusers draws our start noise and VAE posterior samples."""
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    eps = sd.initial_noise(SEEDS, 2, 16, 16, stream=POSTERIOR_STREAM)
    module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_depth2img
    monkeypatch.setattr(module, "retrieve_latents", lambda enc, generator=None, sample_mode="sample":
                        enc.latent_dist.mean + enc.latent_dist.std * _nchw(eps))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))


def test_estimated_depth_generation_matches_diffusers(depth_folder, monkeypatch):
    _, ref_pipe, pipe = depth_folder
    images = _images(0)
    out = pipe(PROMPTS, image=images, strength=0.7, **RUN)
    _same_draws(monkeypatch, pipe.sd)
    kw = dict(prompt=PROMPTS, image=images, negative_prompt=NEGATIVE, strength=0.7, num_inference_steps=4,
              guidance_scale=6.0, output_type="np")
    ref = ref_pipe(**kw).images
    estimated = ref_pipe.depth_estimator(ref_pipe.feature_extractor(images=images, return_tensors="pt").pixel_values)
    flipped = ref_pipe(**kw, depth_map=-estimated.predicted_depth.detach()).images
    assert out.shape == ref.shape == (2, 16, 16, 3)
    assert ref.std() > 0.02
    assert np.abs(flipped - ref).max() > 20 * TOL  # the depth channel matters well beyond the tolerance
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [(2, 20, 12), (1, 5, 7)])
def test_user_depth_channel_matches_diffusers(depth_folder, shape):
    """Bicubic resize to the latent size and per-map [-1, 1] normalisation, with diffusers' batch repeat."""
    _, ref_pipe, pipe = depth_folder
    depth = np.random.default_rng(2).uniform(0.0, 3.0, shape).astype(np.float32)
    d = pipe.depth_input(_images(1), depth, 2)
    ours = np.asarray(depth2img.depth_latents(None, d, 8, 8))[..., 0]
    ref = ref_pipe.prepare_depth_map(_images(1), torch.from_numpy(depth), 2, False, torch.float32,
                                     torch.device("cpu")).numpy()[:, 0]
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert ours.min() == -1.0 and ours.max() == 1.0


def test_new_images_depths_strengths_and_steps_compile_nothing(depth_folder):
    _, _, pipe = depth_folder
    first = pipe(PROMPTS, image=_images(0), strength=0.7, **RUN)
    size = depth2img.generate_jit._cache_size()
    runs = [pipe(PROMPTS, image=_images(5), strength=0.7, **RUN),                # new images: new estimated depths
            pipe(PROMPTS, image=_images(0), strength=0.9, **{**RUN, "steps": 6}),
            pipe(PROMPTS, image=_images(0), strength=0.5, **{**RUN, "guidance": 3.0})]
    assert depth2img.generate_jit._cache_size() == size
    for r in runs:
        assert np.abs(r - first).max() > 1e-3


def test_bad_inputs_are_refused_with_the_fix(depth_folder, tmp_path):
    root, _, pipe = depth_folder
    assert depth2img.is_depth_folder(root) and not depth2img.is_depth_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    for name, config in (("unet", {"in_channels": 4}), ("vae", {"latent_channels": 4})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert not depth2img.is_depth_folder(tmp_path)  # a text-to-image folder
    image = np.full((16, 16, 3), 0.5, np.float32)
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    with pytest.raises(ValueError, match="needs an init image"):
        pipe(PROMPTS, depth_map=ramp)
    with pytest.raises(ValueError, match="one channel"):
        pipe(PROMPTS, image=image, depth_map=np.stack([ramp] * 3, axis=-1)[None])
    with pytest.raises(ValueError, match="3 depth maps for 2 images"):
        pipe(PROMPTS, image=image, depth_map=np.stack([ramp] * 3))
    with pytest.raises(ValueError, match="constant"):
        pipe(PROMPTS, image=image, depth_map=np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        pipe(PROMPTS, image=image, depth_map=np.where(ramp > 0.5, np.nan, ramp))
    with pytest.raises(ValueError, match="pass depth_map="):
        depth2img.StableDiffusionDepth.from_parts(pipe.sd)(PROMPTS, image=image)
    with pytest.raises(ValueError, match="depth2img"):
        pipe.sd(PROMPTS, steps=2)  # the plain SD recipe would feed the depth U-Net 4 channels
    plain = dataclasses.replace(pipe.sd, models=dataclasses.replace(pipe.sd.models, unet_in_channels=4))
    with pytest.raises(ValueError, match="reading 5 channels"):
        depth2img.StableDiffusionDepth.from_parts(plain)


def test_depth_image_files_load_as_one_map(tmp_path):
    """What ``--depth-map FILE`` reads: a 16-bit gray PNG keeps its levels; an RGB image is converted to gray."""
    from PIL import Image

    levels = (np.arange(6 * 4, dtype=np.uint16).reshape(6, 4) * 2000)
    Image.fromarray(levels).save(tmp_path / "d16.png")
    d = depth2img.load_depth_map(tmp_path / "d16.png")
    assert d.shape == (1, 6, 4) and d.dtype == np.float32
    np.testing.assert_array_equal(d[0], levels.astype(np.float32))
    rgb = np.zeros((6, 4, 3), np.uint8)
    rgb[:, 2:] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    d = depth2img.load_depth_map(tmp_path / "rgb.png")
    assert d.shape == (1, 6, 4) and d[0, 0, 0] == 0 and d[0, 0, 3] == 200


def test_cli_depth_map_equals_the_api_and_reproduces_from_the_png(depth_folder, tmp_path):
    """``jaxdiff sample --model DEPTH --init-image --depth-map``: the image of the API call with that depth file,
    recorded in the PNG, ``--from-png`` reproduces it; a depth map for a plain model is refused."""
    from PIL import Image

    from jaxdiff.cli import main
    from jaxdiff.images import read_settings

    root, _, pipe = depth_folder
    init, depth_file = tmp_path / "init.png", tmp_path / "depth.png"
    _images(4)[0].save(init)
    ramp = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    Image.fromarray(ramp).save(depth_file)
    out = tmp_path / "out.png"
    args = ["sample", "--model", str(root), "--prompt", PROMPTS[0], "--init-image", str(init), "--depth-map",
            str(depth_file), "--strength", "0.7", "--steps", "3", "--sampler", "ddim", "--guidance", "6",
            "--seed", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    api = pipe(PROMPTS[0], image=Image.open(init), depth_map=depth2img.load_depth_map(depth_file), strength=0.7,
               steps=3, sampler="ddim", guidance=6.0, seed=3, output="pil")[0]
    got = np.asarray(Image.open(out).convert("RGB"), np.int16)
    assert np.abs(got - np.asarray(api, np.int16)).max() <= 1
    assert read_settings(out)["depth_map"] == str(depth_file.resolve())
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    plain = folders.save(folders.build_pipeline(), tmp_path / "plain")
    assert main([*args[:2], str(plain), *args[3:]]) == 2  # --depth-map needs a depth-to-image model
