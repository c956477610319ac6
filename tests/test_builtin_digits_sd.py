"""The shipped digits-sd and digits-clip: loadable by diffusers / transformers unchanged, equal to jaxdiff there,
and drawing / reading what the text says (judged from pixels)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from jaxdiff import builtin  # noqa: E402
from jaxdiff.cli import main  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402
from jaxdiff.images import read_settings  # noqa: E402

PROMPTS = ["a thick red seven on a white background", "the digit 2, drawn in blue on yellow",
           "a thin green four on a black background", "an upright orange zero on a purple background"]
NEGATIVE = ["", "", "a thick digit", ""]


@pytest.fixture(scope="module")
def sd():
    return builtin.load_pipeline("digits-sd")


@pytest.fixture(scope="module")
def held_out():
    return dt.load_digits_text(augment=1)["held_out"]


def test_digits_sd_is_a_diffusers_folder_that_diffusers_samples_the_same(sd):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    folder = builtin.builtin_folder("digits-sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))  # its own scheduler, unchanged
    pipe.set_progress_bar_config(disable=True)
    seeds = [0, 1, 2, 3]
    noise = sd.initial_noise(seeds, 4, 32, 32)
    ref = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=20, guidance_scale=5.0,
               latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))), output_type="np").images
    out = sd(PROMPTS, negative=NEGATIVE, steps=20, guidance=5.0, seed=seeds)
    assert sd.plan(20).sampler_name == "dpmpp_2m"  # the folder's scheduler, reproduced
    assert out.shape == ref.shape == (4, 32, 32, 3) and ref.std() > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)


def test_digits_sd_draws_the_digit_and_colours_it_is_asked_for(sd, held_out):
    """Twenty held-out captions (never trained on) at guidance 5: the judge reads the digit and the pixels
    the colours far above chance (10% and ~2%); a random-weight or caption-blind model fails this."""
    prompts = [str(c) for c in held_out["caption"][:20]]
    images = sd(prompts, steps=20, guidance=5.0, seed=list(range(20)))
    judge = builtin.load_builtin("digits-eval")
    digit = np.argmax(np.asarray(judge(dt.judge_input(images))), -1)
    attrs = dt.measure_attributes(images, held_out["label"][:20])
    assert np.mean(digit == held_out["label"][:20]) >= 0.8
    assert np.mean((attrs["ink"] == held_out["ink"][:20]) & (attrs["background"] == held_out["background"][:20])) >= 0.8


def test_digits_clip_loads_in_transformers_with_the_same_features_and_reads_digits(held_out):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    folder = builtin.builtin_folder("digits-clip")
    model, tok = builtin.load_clip("digits-clip")
    ref = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    ref_tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    texts = [f"a photo of the digit {k}" for k in range(10)]
    length = model.config.text_config.max_position_embeddings
    ids = tok(texts, padding="max_length", max_length=length).input_ids
    assert ids == ref_tok(texts, padding="max_length", max_length=length).input_ids
    images = held_out["image"][:100]
    with torch.no_grad():
        # transformers 5 returns the projected features as the output's pooler_output
        t_ref = ref.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
        pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)) * 2 - 1)
        v_ref = ref.get_image_features(pixel_values=pixels).pooler_output.numpy()
    t = np.asarray(model.get_text_features(jnp.asarray(ids)))
    v = np.asarray(model.get_image_features(jnp.asarray(images * 2 - 1)))
    np.testing.assert_allclose(t, t_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(v, v_ref, atol=1e-4, rtol=1e-4)
    t, v = t / np.linalg.norm(t, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    assert np.mean((v @ t.T).argmax(1) == held_out["label"][:100]) >= 0.8  # zero-shot, chance 0.1


def test_cli_samples_digits_sd_by_name_and_reproduces_from_the_png(tmp_path, capsys):
    out = tmp_path / "seven.png"
    argv = ["sample", "--model", "digits-sd", "--prompt", PROMPTS[0], "--steps", "8", "--guidance", "4",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    settings = read_settings(out)
    assert settings["model"] == "digits-sd" and settings["prompt"] == [PROMPTS[0]]  # the name: portable
    assert (settings["steps"], settings["guidance"]) == (8, 4.0)
    capsys.readouterr()
    plain = tmp_path / "defaults.png"
    assert main(["sample", "--model", "digits-sd", "--prompt", PROMPTS[0], "--out", str(plain), "--no-progress"]) == 0
    d = read_settings(plain)  # the model's own defaults (builtin.PIPELINE_DEFAULTS), not SD's 30 steps at 7.5
    assert (d["steps"], d["guidance"]) == (builtin.PIPELINE_DEFAULTS["digits-sd"]["steps"],
                                           builtin.PIPELINE_DEFAULTS["digits-sd"]["guidance"]) == (20, 3.0)
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again), "--no-progress"]) == 0
    from PIL import Image

    a, b = np.asarray(Image.open(out)), np.asarray(Image.open(again))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    capsys.readouterr()
    assert main(["info", "--model", "digits-sd"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["components"]["unet"]["class"] == "UNet2DConditionModel"
    assert "digits-sd" in info["models"] and info["encoders"] == ["digits-clip"]
