"""DeepFloyd IF stage I + stage II against diffusers' IFPipeline and IFSuperResolutionPipeline on tiny random folders.

Same noise: diffusers' ``randn_tensor`` (in the two IF pipeline modules and DDPMScheduler) is replaced, call by
call, by jaxdiff's documented streams (:func:`_if_folders.stage_noise`: start noise, stage II's augmentation
noise, one draw per step with t > 0), transposed to NCHW. Stage II reads stage I's raw output
(``output_type="pt"``) on both sides, as in diffusers' cascade recipe. Images (``output_type="np"``: ``x/2 + 0.5``
clipped) agree within 1e-3.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import _if_folders as F
from jaxdiff.pipelines import cascade as C
from jaxdiff.pipelines import deepfloyd_if as IF

pytestmark = pytest.mark.xla_optimized  # runs its programs more than it compiles them (tests/conftest.py)

pytest.importorskip("diffusers")
B, SEED = 2, 5
PROMPTS = ["a red digit", "Two Blue Sevens "]  # lower-cased and stripped as IF does; "sevens": unknown


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _reference(p1, p2, *, steps, scales, level, seed, prompt=None, embeds=None, low_size=8, high_size=16):
    """diffusers' stage I then stage II with jaxdiff's noise; raw samples, NHWC."""
    text = dict(prompt=prompt, clean_caption=False) if embeds is None else dict(
        prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
    with F.injected_noise(F.stage_noise(seed, 0, (B, low_size, low_size, 3), steps[0], False)):
        low = p1(**text, num_inference_steps=steps[0], guidance_scale=scales[0], height=low_size, width=low_size,
                 output_type="pt").images
    with F.injected_noise(F.stage_noise(seed, 1, (B, high_size, high_size, 3), steps[1], True)):
        high = p2(**text, image=low, num_inference_steps=steps[1], guidance_scale=scales[1], noise_level=level,
                  height=high_size, width=high_size, output_type="pt").images
    return _nhwc(low), _nhwc(high)


@pytest.fixture(scope="module")
def clip_cascade(tmp_path_factory):
    """The U-Nets of diffusers' IF fast tests (tests/pipelines/deepfloyd_if/__init__.py: ResnetDownsample and
    SimpleCrossAttn blocks, text addition embedding, stage II's noise level as class labels), a CLIP text encoder
    with its tokenizer (the digits cascade's choice), dynamic thresholding; stage I samples with ``learned_range``
    variances (mean guided, variance from the text half), stage II with ``fixed_small`` (its variance channels
    dropped, as diffusers does)."""
    p1, p2 = F.pipelines("if", text="clip", variance=("learned_range", "fixed_small"), sizes=(8, 16), blocks=(32, 64))
    root = F.save_cascade(p1, p2, tmp_path_factory.mktemp("if_clip"))
    # XLA's backend optimisations off: the program compiles much faster and agrees with the optimised one to float32
    fast = jax.jit(IF.generate, static_argnames=("batch", "shapes"),
                   compiler_options={"xla_backend_optimization_level": 0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(IF, "generate_jit", fast)
        yield p1, p2, IF.IFCascade.from_pretrained(root), root


def test_clip_cascade_matches_diffusers_from_prompts(clip_cascade):
    p1, p2, casc, _ = clip_cascade
    run = dict(steps=(4, 3), guidance=(5.0, 3.0), noise_level=100, seed=SEED)
    low, high = casc(PROMPTS, **run, output="raw")
    ref_low, ref_high = _reference(p1, p2, steps=(4, 3), scales=(5.0, 3.0), level=100, seed=SEED, prompt=PROMPTS)
    np.testing.assert_allclose(IF.to_images(low), IF.to_images(ref_low), atol=1e-3)
    np.testing.assert_allclose(IF.to_images(high), IF.to_images(ref_high), atol=1e-3)
    assert np.abs(low).max() <= 1.0 + 1e-6 and np.abs(low).max() > 0.5  # thresholded, not trivial
    assert np.abs(IF.to_images(high) - IF.to_images(np.repeat(np.repeat(low, 2, 1), 2, 2))).max() > 0.05


def test_runtime_values_compile_nothing_new(clip_cascade):
    """Steps, guidance (also <= 1: no guidance, as diffusers), augmentation level, prompts and seed are traced."""
    p1, p2, casc, _ = clip_cascade
    casc(PROMPTS, steps=(4, 3), guidance=(5.0, 3.0), noise_level=100, seed=SEED)
    before = IF.generate_jit._cache_size()
    runs = [dict(steps=(6, 2), guidance=(1.0, 7.0), noise_level=0, seed=1),
            dict(steps=(3, 5), guidance=(0.5, 2.0), noise_level=900, seed=2)]
    outs = [casc(["b", "c d"], **r, output="raw") for r in runs]
    assert IF.generate_jit._cache_size() == before
    ref_low, ref_high = _reference(p1, p2, steps=(3, 5), scales=(0.5, 2.0), level=900, seed=2, prompt=["b", "c d"])
    np.testing.assert_allclose(IF.to_images(outs[1][0]), IF.to_images(ref_low), atol=1e-3)
    np.testing.assert_allclose(IF.to_images(outs[1][1]), IF.to_images(ref_high), atol=1e-3)
    assert np.abs(outs[0][1] - outs[1][1]).max() > 1e-2


def test_super_resolution_alone_matches_diffusers(clip_cascade):
    """Stage II on a given low-resolution image (``IFSuperResolutionPipeline(image=...)``): stage 0's streams."""
    _, p2, casc, _ = clip_cascade
    import torch

    image = np.random.default_rng(1).uniform(-1, 1, size=(B, 8, 8, 3)).astype(np.float32)
    high = casc.stages[1](PROMPTS, image=image, steps=3, guidance=5.0, noise_level=400, seed=3, output="raw")
    with F.injected_noise(F.stage_noise(3, 0, (B, 16, 16, 3), 3, True)):
        ref = p2(PROMPTS, image=torch.from_numpy(image.transpose(0, 3, 1, 2).copy()), num_inference_steps=3,
                 guidance_scale=5.0, noise_level=400, output_type="np", clean_caption=False).images
    np.testing.assert_allclose(IF.to_images(high), ref, atol=1e-3)
    with pytest.raises(ValueError, match="image must be"):
        casc.stages[1](PROMPTS, image=image[:1], steps=3)


def test_v_prediction_super_resolution_matches_diffusers(clip_cascade, tmp_path):
    """A stage II folder whose scheduler says ``prediction_type="v_prediction"`` (digits-cascade's super-resolution
    stage) reads the U-Net's output as v, as diffusers' DDPMScheduler does."""
    import shutil

    import diffusers
    import torch

    _, p2, _, root = clip_cascade
    folder = tmp_path / "stage_2"
    shutil.copytree(root / "stage_2", folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = {**json.loads(cfg_file.read_text()), "prediction_type": "v_prediction"}
    cfg_file.write_text(json.dumps(cfg))
    ref_pipe = diffusers.IFSuperResolutionPipeline(**{**p2.components,
                                                     "scheduler": diffusers.DDPMScheduler.from_config(cfg)})
    ref_pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(2).uniform(-1, 1, size=(B, 8, 8, 3)).astype(np.float32)
    high = IF.IFPipeline.from_pretrained(folder)(PROMPTS, image=image, steps=3, guidance=5.0, noise_level=300, seed=3,
                                                 output="raw")
    with F.injected_noise(F.stage_noise(3, 0, (B, 16, 16, 3), 3, True)):
        ref = ref_pipe(PROMPTS, image=torch.from_numpy(image.transpose(0, 3, 1, 2).copy()), num_inference_steps=3,
                       guidance_scale=5.0, noise_level=300, output_type="np", clean_caption=False).images
    np.testing.assert_allclose(IF.to_images(high), ref, atol=1e-3)
    eps = IF.IFPipeline.from_pretrained(root / "stage_2")(PROMPTS, image=image, steps=3, guidance=5.0, noise_level=300,
                                                          seed=3, output="raw")
    assert np.abs(IF.to_images(high) - IF.to_images(eps)).max() > 1e-2  # the prediction type was read


def test_cli_samples_a_cascade_folder(clip_cascade, tmp_path, capsys):
    """``jaxdiff sample --model <cascade folder>`` with per-stage options: the recipe's images, no new program."""
    from jaxdiff import cli
    from jaxdiff.images import read_settings

    _, _, casc, root = clip_cascade
    casc(PROMPTS, steps=(4, 3), guidance=(5.0, 3.0), noise_level=100, seed=SEED)
    before = IF.generate_jit._cache_size()
    out = tmp_path / "if.png"
    args = ["sample", "--model", str(root), "--prompt", "b", "--prompt", "c d", "--stage-steps", "3,2",
            "--stage-guidance", "4,2.5", "--noise-level", "60", "--seed", "9", "--out", str(out)]
    assert cli.main(args) == 0
    assert IF.generate_jit._cache_size() == before
    _, high = casc(["b", "c d"], steps=(3, 2), guidance=(4.0, 2.5), noise_level=60, seed=9)  # diffusers' (above)
    from PIL import Image

    for i in range(B):
        png = np.asarray(Image.open(tmp_path / f"if-{i:03d}.png"), np.float32) / 255.0
        np.testing.assert_allclose(png, high[i], atol=0.5 / 255 + 1e-4)
    assert read_settings(out)["stage_steps"] == [3, 2] and (tmp_path / "if-stage1.png").is_file()
    assert cli.main(["sample", "--model", str(root), "--prompt", "a", "--sampler", "ddim"]) == 2
    assert cli.main(["sample", "--model", str(root), "--prompt", "a", "--stage-steps", "3,2,1"]) == 2
    assert "one per stage" in capsys.readouterr().err
    assert cli.main(["info", "--model", str(root)]) == 0
    assert '"IFSuperResolutionPipeline"' in capsys.readouterr().out


def test_aligned_corner_resize_matches_torch():
    import torch

    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), (13, 16), mode="bilinear",
                                          align_corners=True)
    np.testing.assert_allclose(C.resize_align_corners(jax.numpy.asarray(x), (13, 16)), _nhwc(ref), atol=1e-6)


def test_folder_errors(clip_cascade, tmp_path):
    _, _, casc, root = clip_cascade
    (tmp_path / "cascade.json").write_text(json.dumps({"stages": [str(root / "stage_1"), "../x/stage_2"]}))
    assert IF.is_cascade_folder(tmp_path)
    assert IF.stage_folders(tmp_path) == [root / "stage_1", tmp_path / "../x/stage_2"]
    (tmp_path / "cascade.json").write_text(json.dumps({"stages": "stage_1"}))
    with pytest.raises(ValueError, match="must hold"):
        IF.stage_folders(tmp_path)
    (tmp_path / "cascade.json").unlink()
    with pytest.raises(ValueError, match="noise_level must be an integer step"):
        casc(PROMPTS, steps=(2, 2), noise_level=1000)
    with pytest.raises(ValueError, match="one per stage"):
        casc(PROMPTS, steps=(2, 2, 2))
    with pytest.raises(ValueError, match="needs the low-resolution image"):
        casc.stages[1](PROMPTS, steps=2)
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "model_index.json").write_text(json.dumps({"_class_name": "IFPipeline"}))
    with pytest.raises(FileNotFoundError, match="unet/ is missing"):
        IF.IFCascade.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no stage_1/"):
        IF.IFCascade.from_pretrained(tmp_path / "stage_1")


# ---- T5 (IF's text encoder) -----------------------------------------------------------------------------

def test_t5_text_encoder_reads_prompts_as_diffusers(tmp_path):
    """IF encodes prompts with T5 under the tokenizer's attention mask (``encode_prompt``); jaxdiff's in-program
    encoding of token ids and masks equals transformers' T5EncoderModel (a padded prompt included)."""
    import torch

    from jaxdiff.convert import load_model_folder
    from jaxdiff.models._pure import PureModel

    t5 = F.t5_encoder()
    t5.save_pretrained(str(tmp_path / "t5"), safe_serialization=True)
    ids = torch.tensor(np.random.default_rng(0).integers(2, 99, size=(B, 9)))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = t5(ids, attention_mask=mask).last_hidden_state.numpy()
    models = IF.IFModels(None, PureModel.of(load_model_folder(tmp_path / "t5")), None, None, text_kind="t5")
    ours = models.encode_text(jax.numpy.asarray(ids.numpy()), jax.numpy.asarray(mask.numpy()))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_t5_tokenizer_folder_end_to_end(tmp_path):
    """A stage I folder with T5's SentencePiece ``tokenizer/`` (IF's layout): prompts in, the image of diffusers'
    IFPipeline with the same noise, T5 under the tokenizer's attention mask (padding to 77 tokens)."""
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
              *((f"\u2581{w}", -1.0 - i / 10) for i, w in enumerate(F.WORDS))]
    tok = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    p1, _ = F.pipelines("if", text="t5", sizes=(8, 16), blocks=(32, 64))
    p1.register_modules(tokenizer=tok)
    p1.save_pretrained(str(tmp_path / "stage_1"), safe_serialization=True)
    stage = IF.IFPipeline.from_pretrained(tmp_path / "stage_1")
    assert type(stage.tokenizer).__name__.startswith("T5Tokenizer")
    prompts = ["A red digit", "seven blue two e"]
    ids, mask = stage.tokenize(prompts)
    ref = tok([p.lower() for p in prompts], padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(ids, ref.input_ids)
    np.testing.assert_array_equal(mask, ref.attention_mask)
    assert ids.shape == (B, 77) and 3 < mask.sum(1).min() < 77
    low = stage(prompts, steps=2, guidance=4.0, seed=SEED, output="raw")
    with F.injected_noise(F.stage_noise(SEED, 0, (B, 8, 8, 3), 2, False)):
        want = p1(prompt=prompts, clean_caption=False, num_inference_steps=2, guidance_scale=4.0, height=8, width=8,
                  output_type="pt").images
    np.testing.assert_allclose(IF.to_images(low), IF.to_images(_nhwc(want)), atol=1e-3)
