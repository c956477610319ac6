"""examples/digits_sd/train.py at a microscopic size: the vae and unet stages run on a given digits-clip folder,
training.json records them, and the digits-sd folder loads in diffusers (StableDiffusionPipeline, unchanged) and in
jaxdiff with the same networks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._examples import load_script

ROOT = Path(__file__).resolve().parents[1]


MICRO_VAE = {"model": {"block_out_channels": [8, 8, 8], "layers_per_block": 1, "latent_channels": 4,
                       "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 3,
                       "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 32},
             "steps": 3, "batch_size": 16, "optimizer": {"learning_rate": 1e-3, "warmup_steps": 1}}
MICRO_UNET = {"model": {"sample_size": 8, "block_out_channels": [8, 16], "layers_per_block": 1,
                        "norm_num_groups": 4, "attention_head_dim": 2,
                        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
              "steps": 3, "batch_size": 16, "optimizer": {"learning_rate": 1e-3, "warmup_steps": 1},
              "text_layers": 0}  # the micro tower cut to its embeddings: the folder ships the cut tower


def test_micro_run_writes_a_folder_diffusers_and_jaxdiff_load_alike(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples" / "digits_sd"))
    ex = load_script("examples/digits_sd/train.py", "digits_sd_train")
    clip_test = load_script("tests/test_digits_clip_example.py", "digits_clip_example_test")
    data = {"train": clip_test._mini_split(48, 0), "held_out": clip_test._mini_split(16, 1)}
    configs = {"vae": ex.load_config("vae", **MICRO_VAE), "unet": ex.load_config("unet", **MICRO_UNET)}
    # A micro digits-clip folder (untrained: the clip stage itself is train_clip.run, tested with its script).
    clip_cfg = {**ex.train_clip.load_config(), **clip_test.MICRO}
    tok = ex.train_clip.restricted_tokenizer(ex.train_clip.caption_vocabulary_texts(list(data["train"]["caption"])),
                                             clip_cfg["max_length"])
    clip_model = ex.train_clip.CLIPModel(ex.train_clip.model_config(clip_cfg, len(tok.get_vocab()), tok.eos_token_id),
                                         rngs=ex.nnx.Rngs(0))
    clip_dir = ex.train_clip.save(clip_model, tok, tmp_path / "clip")

    with pytest.raises(FileNotFoundError, match="vae"):  # a later stage alone needs the earlier outputs
        ex.run(tmp_path / "empty", ("unet",), clip=clip_dir, configs=configs, progress=False, data=data)

    log = ex.run(tmp_path, ("vae", "unet"), clip=clip_dir, configs=configs, progress=False, data=data)
    assert json.loads((tmp_path / "training.json").read_text()) == json.loads(json.dumps(log))
    for stage in ("vae", "unet"):
        assert log[stage]["seconds"] > 0
    assert {"vae_recon_psnr_db", "vae_recon_judge_accuracy", "scaling_factor"} <= set(log["vae"])
    assert log["unet"]["training"]["steps"] == 3

    folder = tmp_path / "digits-sd"
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                  "scheduler"}
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"

    from jaxdiff.pipelines import StableDiffusion

    sd = StableDiffusion.from_pretrained(folder)
    # scaling_factor is 1 / std of the training latents: the scaled latents have unit std.
    mean, _ = ex.encode_latents(ex.load_model_folder(folder / "vae", class_name="AutoencoderKL"),
                                data["train"]["image"])
    np.testing.assert_allclose(np.std(mean * pipe.vae.config.scaling_factor), 1.0, rtol=1e-3)
    assert sd.models.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)

    # The same networks: text states, U-Net noise prediction and VAE decoding agree with diffusers' torch modules
    # (compiled, as the pipeline runs them: eagerly each of their ops compiled on its own, 13 s of the test).
    prompt = "a thick red 7 on a white background"
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids.numpy(), sd.tokenize([prompt]))
    with torch.no_grad():
        ctx_t = pipe.text_encoder(ids)[0]
    ctx = jax.jit(lambda m, i: m.encode_text(i))(sd.models, jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(np.asarray(ctx), ctx_t.numpy(), atol=1e-4)
    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        eps_t = pipe.unet(torch.tensor(z.transpose(0, 3, 1, 2)), 500, ctx_t).sample.numpy().transpose(0, 2, 3, 1)
        img_t = pipe.vae.decode(torch.tensor(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    eps = jax.jit(lambda unet, *a: unet(*a))(sd.models.unet, jnp.asarray(z), jnp.asarray([500.0]), ctx)
    np.testing.assert_allclose(np.asarray(eps), eps_t, atol=1e-4)
    img = jax.jit(lambda decode, z: decode(z))(sd.models.vae.bind("decode"), jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(img), img_t, atol=1e-4)


@pytest.mark.parametrize("layers", [None, 2, 0])
def test_text_encoder_cut_to_its_first_layers_reads_that_hidden_state(tmp_path, layers):
    """A text tower cut to ``layers`` layers (SD 2.x style) gives, in transformers and in jaxdiff, the full tower's
    hidden state at that depth through the final norm; a cut deeper than the tower is refused."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples" / "digits_sd"))
    ex = load_script("examples/digits_sd/train.py", "digits_sd_train")
    clip_dir = ROOT / "jaxdiff" / "assets" / "digits" / "digits-clip"
    folder = ex.text_encoder_folder(clip_dir, tmp_path / "text_encoder", layers)
    ids = ex.train_clip.tokenize(ex.load_tokenizer(clip_dir), ["a thick red 7 on a white background"], 24)
    full = ex.load_text_encoder(clip_dir)
    want = np.asarray(full.hidden_state(jnp.asarray(ids), -1 if layers is None else layers, True))
    with torch.no_grad():
        got_t = transformers.CLIPTextModel.from_pretrained(folder)(torch.tensor(ids)).last_hidden_state.numpy()
    got = np.asarray(ex.load_model_folder(folder, class_name="CLIPTextModel").hidden_state(jnp.asarray(ids)))
    np.testing.assert_allclose(got_t, want, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="between 0 and the text tower's 3 layers"):
        ex.text_encoder_folder(clip_dir, tmp_path / "too_deep", 4)
