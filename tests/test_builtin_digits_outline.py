"""The shipped digits-outline files (a kohya LoRA, a diffusers embedding, a hypernetwork): diffusers reads the LoRA
and the embedding to the same images / token ids as jaxdiff, and every file loads back through jaxdiff's readers."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from benchmarks.personalisation import FILES, TOKEN  # noqa: E402
from jaxdiff import builtin, lora  # noqa: E402
from jaxdiff import textual_inversion as ti  # noqa: E402
from jaxdiff.models import hypernetwork as hnet  # noqa: E402

PROMPTS = ["a thick red seven on a white background", "the digit 2, drawn in blue on yellow"]


def test_shipped_lora_and_embedding_read_the_same_in_diffusers():
    folder = builtin.builtin_folder("digits-outline")
    sd = builtin.load_pipeline("digits-sd")
    sd_l, net = lora.apply(sd, [lora.load_lora(folder / FILES["lora"], sd)], [1.0])
    seeds = [0, 1]
    noise = sd.initial_noise(seeds, 2, 32, 32)
    out = sd_l(PROMPTS, network_transform=net, steps=8, guidance=3.0, seed=seeds, mesh=None)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(builtin.builtin_folder("digits-sd")))
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(prompt=PROMPTS, num_inference_steps=8, guidance_scale=3.0, output_type="np",
                 latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))).images
    pipe.load_lora_weights(str(folder / FILES["lora"]))
    ref = pipe(prompt=PROMPTS, num_inference_steps=8, guidance_scale=3.0, output_type="np",
               latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))).images
    assert np.abs(ref - plain).max() > 0.05  # the LoRA changes the images
    np.testing.assert_allclose(out, ref, atol=1e-3)
    pipe.unload_lora_weights()
    pipe.load_textual_inversion(str(folder / FILES["textual_inversion"]), token=TOKEN)
    sd_t = ti.load_textual_inversion(sd, folder / FILES["textual_inversion"], TOKEN)
    prompt = f"{PROMPTS[0]} {TOKEN}"
    ours = sd_t.tokenize([prompt])[0]  # jaxdiff expands the multi-vector token itself
    theirs = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, truncation=True)["input_ids"]
    assert list(ours) == list(theirs)
    hn = hnet.load_hypernetwork(folder / FILES["hypernetwork"])
    assert hn.num_params() > 0
