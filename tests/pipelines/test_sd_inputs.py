"""Bad input to the Stable Diffusion pipeline: clear errors and warnings, raised before any compilation."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from jaxdiff.convert import MissingComponentsError
from jaxdiff.pipelines import StableDiffusion
from jaxdiff.pipelines.schedulers import img2img_start, plan, training_schedule

KW = dict(steps=3, height=8, width=8)


def test_size_must_be_a_multiple_of_the_vae_factor(tiny_sd):
    with pytest.raises(ValueError, match="height must be a positive multiple of 2"):
        tiny_sd.request("a", height=7, width=8, steps=3)
    with pytest.raises(ValueError, match="width must be a positive multiple of 2"):
        tiny_sd.request("a", height=8, width=0, steps=3)


def test_missing_folder_and_components(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusion.from_pretrained(tmp_path / "nope")
    root = tmp_path / "sd"
    root.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(MissingComponentsError) as err:
        StableDiffusion.from_pretrained(root)
    msg = str(err.value)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert name in msg
    assert "scheduler" not in msg.replace("scheduler_config", "")


def test_long_prompt_is_truncated_with_a_warning(tiny_sd):
    long = " ".join(["a"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tiny_sd.tokenize([long, "b"])
    assert ids.shape == (2, tiny_sd.max_length)
    assert ids[0, 0] == 0 and ids[0, -1] == 1  # BOS ... EOS kept, as diffusers' truncation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_sd.tokenize(["a b"])


def test_mask_of_the_wrong_size(tiny_sd):
    image = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="mask is 6x8 but the image is 8x8"):
        tiny_sd.request("a", image=image, mask=np.ones((6, 8)), **KW)
    with pytest.raises(ValueError, match="mask needs an init image"):
        tiny_sd.request("a", mask=np.ones((8, 8)), **KW)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_strength_outside_unit_interval(tiny_sd, strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        tiny_sd.request("a", image=np.zeros((8, 8, 3), np.float32), strength=strength, **KW)


def test_strength_start_matches_diffusers_get_timesteps():
    assert img2img_start(50, 0.8) == 10
    assert img2img_start(10, 1.0) == 0
    assert img2img_start(3, 0.5) == 2  # int(1.5) = 1 step
    with pytest.raises(ValueError, match="runs no step"):
        img2img_start(3, 0.2)


def test_bad_image_and_names(tiny_sd):
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        tiny_sd.request("a", image=np.full((8, 8, 3), 255.0, np.float32), **KW)
    with pytest.raises(ValueError, match="init image is 8x8 but height x width is 16x16"):
        tiny_sd.request("a", image=np.zeros((8, 8, 3), np.float32), steps=3, height=16, width=16)
    with pytest.raises(ValueError, match="unknown sampler 'nope'; valid samplers: .*ddim"):
        tiny_sd.request("a", sampler="nope", **KW)
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        tiny_sd.request("a", schedule="nope", **KW)
    with pytest.raises(ValueError, match="got 3 negative prompts for 2 prompts"):
        tiny_sd.request(["a", "b"], negative=["a", "b", "c"], **KW)
    with pytest.raises(ValueError, match="give one seed or 2 seeds"):
        tiny_sd.request(["a", "b"], seed=[1, 2, 3], **KW)


def test_a_list_of_init_images_is_read_like_one_array(tiny_sd):
    """One init image per prompt as a list of PIL images or arrays: the same [-1, 1] pixels as the stacked array."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    stacked, _, _ = tiny_sd.request(["a", "b"], image=pixels.astype(np.float32) / 255.0, **KW)
    for images in ([Image.fromarray(p) for p in pixels], list(pixels.astype(np.float32) / 255.0)):
        req, _, _ = tiny_sd.request(["a", "b"], image=images, **KW)
        np.testing.assert_allclose(np.asarray(req.image), np.asarray(stacked.image), atol=1e-6)
    assert float(np.asarray(stacked.image).min()) < -0.9


def test_scheduler_config_mapping(monkeypatch):
    cfg = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "steps_offset": 1, "prediction_type": "v_prediction"}
    train = training_schedule(cfg)
    assert train.prediction == "v_prediction"
    p = plan(train, 4)
    assert p.sampler_name == "ddim" and p.sampler.threshold is not None  # DDIM's class default clip_sample=True
    np.testing.assert_allclose(np.interp(p.sigmas.used()[:4], train.sigmas, np.arange(1000)), [751, 501, 251, 1],
                               atol=1e-2)
    from jaxdiff.pipelines import schedulers

    monkeypatch.setattr(schedulers, "_WARNED", set())
    with pytest.warns(UserWarning, match="KDPM2DiscreteScheduler has no jaxdiff equivalent"):
        assert plan(training_schedule(dict(cfg, _class_name="KDPM2DiscreteScheduler")), 4).sampler_name == "dpmpp_2m"
    with pytest.raises(ValueError, match="prediction_type"):
        training_schedule(dict(cfg, prediction_type="flow"))
