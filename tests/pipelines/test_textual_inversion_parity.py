"""Textual inversion and hypernetworks against diffusers on a tiny random folder: diffusers' load_textual_inversion
(token ids, table rows, images), and hypernetworks as diffusers attention processors applying the same context
transform in torch (images), in one compiled jaxdiff program."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _sd_folders as folders  # noqa: E402
from jaxdiff import textual_inversion as ti  # noqa: E402
from jaxdiff.models import hypernetwork as hnet  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import generate_jit  # noqa: E402
from tests.models._hypernetwork_files import hyper_processors, write_file  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a <style> photo of <cat-toy>", "<cat-toy> on a hill"]
NEGATIVE = ["<style>", "blurry"]
SEEDS = [5, 9]
TOL = 1e-3


def test_embeddings_and_hypernetworks_match_diffusers(tmp_path):
    """An AUTOMATIC1111 .pt embedding (two vectors, torch.save) and a diffusers learned_embeds file written by
    jaxdiff (one vector): diffusers' load_textual_inversion reads both; token ids, rows and images equal jaxdiff's.
    A hypernetwork for the text width (32) and the mid block's width (16; the outer blocks are 8 wide) at strength
    0.8 and then 0 (the same compiled program) equals diffusers with the transform done in torch, and without."""
    root = folders.save(folders.build_pipeline(seed=3), tmp_path / "sd")
    rng = np.random.default_rng(0)
    style = rng.standard_normal((2, folders.TEXT_DIM)).astype(np.float32)
    toy = rng.standard_normal((1, folders.TEXT_DIM)).astype(np.float32)
    pt = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(style))}, "string_to_token": {"*": 265},
                "name": "<style>", "step": 100}, pt)
    st = ti.save_embedding(tmp_path / "learned_embeds.safetensors", ti.Embedding("<cat-toy>", toy))
    mlps = write_file(tmp_path / "hyper.pt", "relu_norm_dropout", [folders.TEXT_DIM, 16], seed=2)

    sd = ti.load_textual_inversion(StableDiffusion.from_pretrained(root), [pt, st], token=["<style>", None])
    hn = hnet.load_hypernetwork(tmp_path / "hyper.pt")
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

    noise = torch.from_numpy(np.ascontiguousarray(sd.initial_noise(SEEDS, 2, 16, 16).transpose(0, 3, 1, 2)))
    settings = dict(negative=NEGATIVE, steps=3, sampler="ddim", guidance=7.5, seed=SEEDS, height=16, width=16)
    reference = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, height=16,
                     width=16, latents=noise, output_type="np")
    plain_ref = pipe(**reference).images
    hyper_processors(pipe.unet, mlps, 0.8)
    hyper_ref = pipe(**reference).images
    assert plain_ref.std() > 0.02 and np.abs(hyper_ref - plain_ref).max() > 0.02

    hyper = sd(PROMPTS, network_transform=hnet.hypernetworks((hn, 0.8)), **settings)
    np.testing.assert_allclose(hyper, hyper_ref, atol=TOL, rtol=0)
    compiled = generate_jit._cache_size()
    plain = sd(PROMPTS, network_transform=hnet.hypernetworks((hn, 0.0)), **settings)
    assert generate_jit._cache_size() == compiled  # a new strength compiles nothing
    np.testing.assert_allclose(plain, plain_ref, atol=TOL, rtol=0)  # textual inversion alone
