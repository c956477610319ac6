"""unCLIP against diffusers' UnCLIPPipeline and UnCLIPImageVariationPipeline on tiny random components (every
parameter perturbed, so the zero-initialised prior tokens, clip statistics and null image embedding act), with the
same start noise and the same ancestral noise (diffusers' UnCLIPScheduler made to draw jaxdiff's), plus the
scheduler equivalence, one compiled program across step counts and scales, and slerp."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdiff.pipelines import unclip as U

import _tiny_sd

E, CTX, L = 16, 12, 8  # CLIP width, decoder context width, text length
PROMPTS = ["a b", "c d e"]
SEED = 3


def _perturb(model, seed: int, scale: float = 0.1):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _components(folder):
    import diffusers
    import torch
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=E,
                                       projection_dim=E, intermediate_size=24, num_attention_heads=2,
                                       num_hidden_layers=1, vocab_size=10, max_position_embeddings=L)
    vision = transformers.CLIPVisionConfig(hidden_size=E, projection_dim=E, intermediate_size=24,
                                           num_attention_heads=2, num_hidden_layers=1, image_size=8, patch_size=4)
    sr = dict(sample_size=16, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",),
              up_block_types=("ResnetUpsampleBlock2D",), block_out_channels=(8,), in_channels=6, out_channels=3,
              norm_num_groups=4)
    return dict(
        prior=_perturb(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=E,
                                                  num_layers=1, num_embeddings=L), 1, 0.3),
        decoder=_perturb(diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=3, out_channels=6, block_out_channels=(8,), layers_per_block=1,
            down_block_types=("SimpleCrossAttnDownBlock2D",), up_block_types=("SimpleCrossAttnUpBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=CTX, attention_head_dim=4,
            norm_num_groups=4, resnet_time_scale_shift="scale_shift", class_embed_type="identity"), 2),
        text_proj=_perturb(UnCLIPTextProjModel(clip_extra_context_tokens=2, clip_embeddings_dim=E, time_embed_dim=32,
                                               cross_attention_dim=CTX), 3, 0.3),
        text_encoder=_perturb(transformers.CLIPTextModelWithProjection(text), 4),
        tokenizer=_tiny_sd.tokenizer(folder / "tok", max_length=L),
        super_res_first=_perturb(diffusers.UNet2DModel(**sr), 5),
        super_res_last=_perturb(diffusers.UNet2DModel(**sr), 6),
        image_encoder=_perturb(transformers.CLIPVisionModelWithProjection(vision), 7),
        feature_extractor=transformers.CLIPImageProcessor(crop_size=8, size=8),
        prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                  clip_sample_range=5.0),
        decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    U.sample_jit.clear_cache()  # the program counts below are this module's (other files may sample unCLIP first)
    root = tmp_path_factory.mktemp("unclip")
    c = _components(root)
    text_keys = ("prior", "decoder", "text_proj", "text_encoder", "tokenizer", "super_res_first", "super_res_last",
                 "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
    ref = diffusers.UnCLIPPipeline(**{k: c[k] for k in text_keys})
    var_keys = ("decoder", "text_encoder", "tokenizer", "text_proj", "feature_extractor", "image_encoder",
                "super_res_first", "super_res_last", "decoder_scheduler", "super_res_scheduler")
    ref_var = diffusers.UnCLIPImageVariationPipeline(**{k: c[k] for k in var_keys})
    for p, name in ((ref, "text"), (ref_var, "variation")):
        p.set_progress_bar_config(disable=True)
        p.save_pretrained(str(root / name), safe_serialization=True)
    return ref, ref_var, U.UnCLIP.from_pretrained(root / "text"), U.UnCLIP.from_pretrained(root / "variation"), root


class _JaxNoise:
    """diffusers' UnCLIPScheduler draws its ancestral noise from this queue: jaxdiff's per-step noise of each stage
    (``normal(fold_in(fold_in(fold_in(key, stage), SAMPLER_STREAM), i))``, NHWC -> NCHW), for steps with t > 0."""

    def __init__(self, seed: int, plan: list[tuple[int, int, tuple]]):
        self.queue = []
        key = jax.random.key(seed)
        for stage, steps, shape in plan:
            k = jax.random.fold_in(jax.random.fold_in(key, stage), 2)
            for i in range(steps - 1):
                z = np.asarray(jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))
                self.queue.append(z.transpose(0, 3, 1, 2) if z.ndim == 4 else z)

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        import torch

        z = self.queue.pop(0)
        assert tuple(shape) == z.shape
        return torch.from_numpy(z)


def _starts(batch: int, stages: tuple[str, ...]):
    rng = np.random.default_rng(11)
    shapes = dict(prior=(batch, E), decoder=(batch, 3, 8, 8), super_res=(batch, 3, 16, 16))
    return {f"{s}_latents": rng.standard_normal(shapes[s]).astype(np.float32) for s in stages}


def _diffusers(pipe, monkeypatch, noise, exact_last_step=True, **kwargs):
    """Images and image embeddings of a diffusers pipeline run. ``exact_last_step``: UnCLIPScheduler's last step
    (t = 0 -> "t = -1") returns ``x0 * beta_0 / (1 - abar_0)`` because it uses its stored ``beta_0`` where
    float32 has ``1 - abar_0 = 1 - (1 - beta_0)`` (a factor 0.99947, pinned by
    test_unclip_scheduler_is_ddpm_with_linspace_timesteps); set ``beta_0 = 1 - abar_0`` so that step returns x0,
    as the posterior mean does exactly and jaxdiff's DDPM computes."""
    import torch
    from diffusers.schedulers import scheduling_unclip

    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise)
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        sched = getattr(pipe, name, None)
        if sched is not None:
            betas = sched.betas.clone()
            if exact_last_step:
                betas[0] = 1.0 - sched.alphas_cumprod[0]
            monkeypatch.setattr(sched, "betas", betas)
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["image_embeddings"].numpy().copy()

    hook = pipe.text_proj.register_forward_pre_hook(record, with_kwargs=True)
    try:
        kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    finally:
        hook.remove()
    assert not noise.queue
    return images, seen["embeds"]


@pytest.mark.parity
def test_text_to_image_matches_diffusers(pipes, monkeypatch):
    ref, _, ours, _, _ = pipes
    b, steps = len(PROMPTS), (3, 3, 4)
    starts = _starts(b, ("prior", "decoder", "super_res"))
    noise = _JaxNoise(SEED, [(U.PRIOR, steps[0], (b, E)), (U.DECODER, steps[1], (b, 8, 8, 3)),
                             (U.SUPER_RES, steps[2], (b, 16, 16, 3))])
    scales = dict(prior_guidance_scale=3.0, decoder_guidance_scale=5.0)
    want, want_embeds = _diffusers(ref, monkeypatch, noise, prompt=PROMPTS, prior_num_inference_steps=steps[0],
                                   decoder_num_inference_steps=steps[1], super_res_num_inference_steps=steps[2],
                                   **scales, **starts)
    before = U.sample_jit._cache_size()
    got, embeds, small = ours(PROMPTS, prior_steps=steps[0], decoder_steps=steps[1], super_res_steps=steps[2],
                              seed=SEED, return_stages=True, **scales, **starts)
    np.testing.assert_allclose(embeds, want_embeds, atol=1e-4, rtol=1e-4)
    assert np.abs(want_embeds).max() > 0.1 and small.std() > 0.1  # non-trivial embeddings and decoder images
    np.testing.assert_allclose(got, want, atol=1e-3)
    # diffusers' own last step (x0 * 0.99947 in every stage): within 2e-3 (propagated through super-resolution)
    noise = _JaxNoise(SEED, [(U.PRIOR, steps[0], (b, E)), (U.DECODER, steps[1], (b, 8, 8, 3)),
                             (U.SUPER_RES, steps[2], (b, 16, 16, 3))])
    raw, _ = _diffusers(ref, monkeypatch, noise, False, prompt=PROMPTS, prior_num_inference_steps=steps[0],
                        decoder_num_inference_steps=steps[1], super_res_num_inference_steps=steps[2], **scales,
                        **starts)
    np.testing.assert_allclose(got, raw, atol=2e-3)
    # other step counts, scales, prompts and start noise: the same compiled program
    other = {k: -v for k, v in starts.items()}
    again = ours(["e", "d"], prior_steps=5, decoder_steps=2, super_res_steps=3, prior_guidance_scale=1.5,
                 decoder_guidance_scale=2.0, seed=1, **other)
    assert U.sample_jit._cache_size() - before == 1 and np.abs(again - got).max() > 0.05
    # a prompt interpolated with itself is that prompt at every point
    same = ours.interpolate_prompts("d", "d", 2, prior_steps=5, decoder_steps=2, super_res_steps=3,
                                    prior_guidance_scale=1.5, decoder_guidance_scale=2.0, seed=1, **other)
    np.testing.assert_allclose(same[1], again[1], atol=1e-4)


@pytest.mark.parity
def test_image_variation_matches_diffusers(pipes, monkeypatch):
    """The variation folder's image encoder gives diffusers' embeddings; decoding them through the text folder (whose
    decoder, text_proj and super-resolution U-Nets are the same) gives UnCLIPImageVariationPipeline's images, and
    variations share text-to-image's compiled program."""
    import torch

    ref, ref_var, ours, ours_var, _ = pipes
    b, steps = 2, (3, 3)
    pixels = np.random.default_rng(5).standard_normal((b, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref_embeds = ref_var.image_encoder(torch.from_numpy(pixels)).image_embeds.numpy()
    embeds = ours_var.encode_images({"pixel_values": pixels.transpose(0, 2, 3, 1)})
    np.testing.assert_allclose(embeds, ref_embeds, atol=1e-5, rtol=1e-5)
    starts = _starts(b, ("decoder", "super_res"))
    noise = _JaxNoise(SEED, [(U.DECODER, steps[0], (b, 8, 8, 3)), (U.SUPER_RES, steps[1], (b, 16, 16, 3))])
    want, want_embeds = _diffusers(ref_var, monkeypatch, noise, image=pixels, decoder_num_inference_steps=steps[0],
                                   super_res_num_inference_steps=steps[1], decoder_guidance_scale=4.0, **starts)
    np.testing.assert_allclose(want_embeds, ref_embeds, atol=1e-6)
    got = ours.variations(image_embeds=embeds, decoder_steps=steps[0], super_res_steps=steps[1],
                          decoder_guidance_scale=4.0, seed=SEED, **starts)
    np.testing.assert_allclose(got, want, atol=1e-3)
    # a two-point interpolation is the two endpoints' variations
    ends = ours.interpolate(embeds[0], embeds[1], 2, decoder_steps=steps[0], super_res_steps=steps[1],
                            decoder_guidance_scale=4.0, seed=SEED, **starts)
    np.testing.assert_allclose(ends, got, atol=1e-4)
    ours(PROMPTS[:1] * 2, prior_steps=2, decoder_steps=2, super_res_steps=2, seed=0)
    assert U.sample_jit._cache_size() == 1  # prompts and image embeddings: one program
    with pytest.raises(ValueError, match="exactly one of image"):
        ours.variations()
    with pytest.raises(ValueError, match="no prior"):
        ours_var(PROMPTS)


@pytest.mark.parity
def test_unclip_scheduler_is_ddpm_with_linspace_timesteps():
    """UnCLIPScheduler's learned_range variance equals DDPMScheduler's (linspace spacing) on every noised step, and
    their steps agree up to float32 rounding: UnCLIPScheduler forms ``alpha = 1 - (1 - abar_t / abar_prev)`` and
    uses the stored ``beta_0`` on the last step (relative differences ~1e-4 at t = 999, 2e-3 of x0 at t = 0, where
    jaxdiff's DDPM returns x0 itself). jaxdiff's plan visits UnCLIPScheduler's timesteps."""
    import torch
    from diffusers import DDPMScheduler, UnCLIPScheduler

    config = dict(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.5)
    a = UnCLIPScheduler(**config)
    b = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", **config)
    n = 6
    a.set_timesteps(n)
    b.set_timesteps(n)
    np.testing.assert_array_equal(a.timesteps.numpy(), b.timesteps.numpy())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for i, t in enumerate(a.timesteps):
        out = torch.randn(2, 6, 4, 4, generator=g)
        prev = a.timesteps[i + 1] if i + 1 < n else None
        if prev is not None:
            np.testing.assert_allclose(a._get_variance(t, prev, out[:, 3:]).numpy(),
                                       b._get_variance(t, out[:, 3:]).numpy(), rtol=1e-6)
        xa = a.step(out, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(i)).prev_sample
        xb = b.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=3e-3)
        x = xa
    # the last step: x0 times beta_0 / (1 - abar_0) = 0.99947 (float32 rounding of 1 - (1 - beta_0))
    r = a.betas[0] / (1.0 - a.alphas_cumprod[0])
    last = a.step(out, a.timesteps[-1], x)
    np.testing.assert_allclose(last.prev_sample.numpy(), (r * last.pred_original_sample).numpy(), rtol=1e-6)
    assert 0.9994 < float(r) < 0.9996
    train, plan = U.scheduler_plan(dict(a.config, _class_name="UnCLIPScheduler"), n)
    sig = np.sqrt((1 - a.alphas_cumprod.numpy()) / a.alphas_cumprod.numpy())
    np.testing.assert_allclose(np.asarray(plan.sigmas.values)[:n + 1], np.append(sig[a.timesteps.numpy()], 0.0),
                               rtol=1e-5)
    assert plan.sampler.variance == "learned_range" and plan.sampler.threshold is not None
    with pytest.raises(ValueError, match="at least 2 steps"):
        U.scheduler_plan(dict(a.config, _class_name="UnCLIPScheduler"), 1)


def test_slerp_endpoints_norm_and_constant_speed():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(8), rng.standard_normal(8)
    b = b / np.linalg.norm(b) * np.linalg.norm(a)
    slerp = jax.jit(U.slerp)
    path = np.asarray(slerp(a, b, np.linspace(0.0, 1.0, 5)))
    np.testing.assert_allclose(path[0], a, atol=1e-5)
    np.testing.assert_allclose(path[-1], b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), np.linalg.norm(a), rtol=1e-5)  # stays on the sphere
    cos = [p @ q / (np.linalg.norm(p) * np.linalg.norm(q)) for p, q in zip(path[:-1], path[1:])]
    np.testing.assert_allclose(cos, cos[0], rtol=1e-5)  # equal angles between neighbours
    # parallel inputs: no division by zero
    np.testing.assert_allclose(np.asarray(slerp(a, a, np.full(5, 0.3)))[0], a, rtol=1e-5)


@pytest.mark.parity
def test_cli_samples_an_unclip_folder(pipes, tmp_path, capsys):
    """``jaxdiff sample --model <unclip folder> --prompt ...``: the final images and the decoder's, in the program
    the folder already compiled (same batch); variations refuse a prompt and need an image encoder."""
    import json

    from PIL import Image

    from jaxdiff import cli

    folder = pipes[4]
    out = tmp_path / "u.png"
    code = cli.main(["sample", "--model", str(folder / "text"), "--prompt", "a b", "--prompt", "c d e",
                     "--prior-steps", "3", "--steps", "2", "--super-res-steps", "2", "--guidance", "3",
                     "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["prior_steps"] == 3 and printed["guidance"] == 3.0
    assert Image.open(out).size == (2 * 16 + 2, 16)  # a grid of two 16x16 images
    assert Image.open(tmp_path / "u-decoder.png").size == (2 * 8 + 1, 8)
    assert (tmp_path / "u-001.png").is_file()
    assert U.sample_jit._cache_size() == 1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    assert cli.main(["sample", "--model", str(folder / "variation"), "--init-image", str(tmp_path / "in.png"),
                     "--prompt", "a"]) == 2
    assert "drop --prompt" in capsys.readouterr().err
    assert cli.main(["sample", "--model", str(folder / "text"), "--init-image", str(tmp_path / "in.png"),
                     "--out", str(tmp_path / "v.png")]) == 2
    assert "needs an image encoder" in capsys.readouterr().err
