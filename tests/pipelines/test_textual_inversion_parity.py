"""Textual inversion against diffusers' load_textual_inversion: same token ids and images on a tiny random folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _sd_folders as folders  # noqa: E402
from jaxdiff import textual_inversion as ti  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a <style> photo of <cat-toy>", "<cat-toy> on a hill"]
NEGATIVE = ["<style>", "blurry"]
SEEDS = [5, 9]


def test_embeddings_match_diffusers_load_textual_inversion(tmp_path):
    """An AUTOMATIC1111 .pt (two vectors, torch.save) and a diffusers learned_embeds file written by jaxdiff
    (one vector): diffusers loads both; the prompts' token ids and the images equal jaxdiff's (<= 1e-3)."""
    root = folders.save(folders.build_pipeline(seed=3), tmp_path / "sd")
    rng = np.random.default_rng(0)
    style = rng.standard_normal((2, folders.TEXT_DIM)).astype(np.float32)
    toy = rng.standard_normal((1, folders.TEXT_DIM)).astype(np.float32)
    pt = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(style))}, "string_to_token": {"*": 265},
                "name": "<style>", "step": 100}, pt)
    st = ti.save_embedding(tmp_path / "learned_embeds.safetensors", ti.Embedding("<cat-toy>", toy))

    sd = ti.load_textual_inversion(StableDiffusion.from_pretrained(root), [pt, st], token=["<style>", None])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(root))
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(pt), token="<style>")
    pipe.load_textual_inversion(str(st))

    for text in PROMPTS + NEGATIVE:
        want = pipe.tokenizer(pipe.maybe_convert_prompt(text, pipe.tokenizer), padding="max_length",
                              max_length=pipe.tokenizer.model_max_length, truncation=True).input_ids
        np.testing.assert_array_equal(sd.tokenize([text])[0], want, err_msg=text)
    assert "<style>_1" in pipe.tokenizer.get_vocab()  # the two-vector token expanded in both
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight.numpy()
    ids = ti.token_ids(sd, "<style>") + ti.token_ids(sd, "<cat-toy>")
    np.testing.assert_array_equal(table[ids], np.concatenate([style, toy]))
    np.testing.assert_array_equal(ti.get_embedding(sd, "<style>").vectors, style)

    out = sd(PROMPTS, negative=NEGATIVE, steps=3, sampler="ddim", guidance=7.5, seed=SEEDS, height=16, width=16)
    noise = sd.initial_noise(SEEDS, 2, 16, 16)
    ref = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, height=16,
               width=16, latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
               output_type="np").images
    assert ref.std() > 0.02
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)
