"""Prompt-to-Prompt (jaxdiff.editing) against diffusers' stored attention probabilities, torch's pooling, the
paper's formulas, and the exact properties of the edit (source reproduced, zero injection = plain generation)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import jax.numpy as jnp

from jaxdiff import editing

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SRC, TGT = "a photo of a cat", "a photo of a dog"
WORDS = ["cat", "dog"]
KW = dict(seed=3, steps=2, sampler="ddim", guidance=7.5, height=16, width=16, record_words=WORDS, blend_grid=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random diffusers Stable Diffusion folder (8x8 latents; cross-attention at 8x8 and in the 4x4 mid
    block) and jaxdiff's pipeline on it."""
    from jaxdiff.pipelines import StableDiffusion
    from tests.pipelines import _sd_folders as folders

    pipe = folders.build_pipeline(seed=5)
    root = folders.save(pipe, tmp_path_factory.mktemp("p2p") / "sd")
    return root, pipe, StableDiffusion.from_pretrained(root)


@pytest.fixture(scope="module")
def reference(tiny):
    """diffusers on the same folder, DDIM, the edit's start noise, both prompts: the words' stored maps and the
    images (plain generation of the source and of the target)."""
    root, pipe, sd = tiny
    noise = np.asarray(editing.edit_settings(sd, [SRC, TGT], seed=3, steps=2, guidance=7.5, cross_steps=0,
                                             self_steps=0, mode="auto", blend_words=None, blend_threshold=0.3,
                                             reweight=None, record_words=WORDS, negative="", latents=None,
                                             uncond_embeddings=None, height=16, width=16)[0].noise)
    words_at = {w: np.stack([editing._indicator(sd, p, [w]) for p in (SRC, TGT)]) for w in WORDS}
    assert words_at["cat"][0].sum() == 1 and words_at["cat"][1].sum() == 0 and words_at["dog"][1].sum() == 1
    return _diffusers_maps(root, pipe, [SRC, TGT], noise, 2, words_at)


def _diffusers_maps(root, pipe, prompts, noise, steps, words_at):
    """diffusers' (DDIM, same noise) probabilities of the conditional rows at the 8x8 cross-attention layers, kept
    by a storing processor, averaged over heads, layers and steps, summed over each word's tokens."""
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import Attention, AttnProcessor

    calls: list = []

    class Storing(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if encoder_hidden_states is not None and hidden_states.shape[1] == 64:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                p = attn.get_attention_scores(q, k, None)
                calls.append(p.reshape(hidden_states.shape[0], attn.heads, *p.shape[1:]).mean(1).detach().numpy())
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    for module in pipe.unet.modules():
        if isinstance(module, Attention):
            module.set_processor(Storing())
    pipe.scheduler = DDIMScheduler.from_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.ascontiguousarray(np.repeat(noise, 2, 0).transpose(0, 3, 1, 2)))
    images = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, height=16, width=16, latents=latents,
                  output_type="np").images
    per_call = np.stack(calls)[:, 2:]  # diffusers' batch is [uncond, cond]
    assert per_call.shape[0] == 3 * steps  # three 8x8 cross-attention layers per step (one down, two up)
    mean = per_call.mean(0).reshape(2, 8, 8, -1)
    return {w: np.einsum("phwt,pt->phw", mean, v) for w, v in words_at.items()}, images


def test_recorded_maps_equal_diffusers_stored_probabilities(tiny, reference):
    out = editing.edit(tiny[2], SRC, TGT, cross_steps=0.0, self_steps=0.0, **KW)
    want, _ = reference
    for w in WORDS:
        assert out.maps[w].shape == (2, 8, 8)
        np.testing.assert_allclose(out.maps[w], want[w], atol=1e-5, rtol=0)
    assert want["cat"][0].max() > 0 and np.all(out.maps["dog"][0] == 0)  # "dog" is not in the source prompt


def test_target_equal_to_source_reproduces_the_source_exactly(tiny, reference):
    out = editing.edit(tiny[2], SRC, SRC, cross_steps=1.0, self_steps=1.0, reweight={"cat": 1.0}, **KW)
    assert out.images[0].std() > 0.01
    np.testing.assert_array_equal(out.images[1], out.images[0])
    np.testing.assert_allclose(out.images[0], reference[1][0], atol=1e-4, rtol=0)  # diffusers' plain generation


def test_zero_injection_word_swap_is_plain_generation_with_the_target(tiny, reference):
    _, _, sd = tiny
    out = editing.edit(sd, SRC, TGT, cross_steps=0.0, self_steps=0.0, **KW)
    plain = reference[1]  # diffusers' images of both prompts from the same noise
    assert np.abs(plain[1] - plain[0]).max() > 1e-2
    np.testing.assert_allclose(out.images, plain, atol=1e-4, rtol=0)
    injected = editing.edit(sd, SRC, TGT, cross_steps=1.0, self_steps=1.0, **KW)
    np.testing.assert_array_equal(injected.images[0], out.images[0])  # the source row is never edited
    assert np.abs(injected.images[1] - plain[1]).max() > 1e-3  # the injection acts


def test_local_blend_mask_of_zero_keeps_the_source_and_of_one_the_edit(tiny):
    _, _, sd = tiny
    edited = editing.edit(sd, SRC, TGT, **KW)
    zero = editing.edit(sd, SRC, TGT, blend_words=WORDS, blend_threshold=2.0, **KW)  # nothing exceeds 2 x max
    assert np.all(zero.mask == 0)
    np.testing.assert_array_equal(zero.images[1], zero.images[0])
    one = editing.edit(sd, SRC, TGT, blend_words=WORDS, blend_threshold=-1.0, **KW)
    assert np.all(one.mask == 1)
    np.testing.assert_allclose(one.images, edited.images, atol=1e-6, rtol=0)
    assert np.abs(edited.images[1] - edited.images[0]).max() > 1e-3


def test_blend_composite_keeps_the_source_pixels_outside_the_mask(tiny):
    _, _, sd = tiny
    opts = dict(blend_words=WORDS, blend_normalize="minmax", blend_threshold=0.9, **KW)
    plain = editing.edit(sd, SRC, TGT, **opts)
    pasted = editing.edit(sd, SRC, TGT, blend_composite=True, **opts)
    inside = np.repeat(np.repeat(plain.mask[1], 2, 0), 2, 1) > 0  # latent 8 x 8 -> image 16 x 16
    assert 0 < inside.mean() < 1, inside.mean()
    np.testing.assert_array_equal(pasted.images[0], plain.images[0])
    np.testing.assert_array_equal(pasted.images[1][~inside], plain.images[0][~inside])
    np.testing.assert_array_equal(pasted.images[1][inside], plain.images[1][inside])
    assert np.abs(plain.images[1] - plain.images[0])[~inside].max() > 1e-4  # the decoder alone moved them
    with pytest.raises(ValueError, match="blend_words"):
        editing.edit(sd, SRC, TGT, blend_composite=True, **KW)


def _papers_mask(maps, words, threshold, use_pool, size):
    """Each row's mask as the paper's code makes it, restated in torch: the words' maps summed (P, 1, h, w),
    max-pooled 3 x 3 when ``use_pool``, interpolated (nearest) to ``size``, over their maximum, thresholded."""
    t = torch.from_numpy((maps * words[:, None, None]).sum(-1))[:, None]
    if use_pool:
        t = torch.nn.functional.max_pool2d(t, (3, 3), (1, 1), padding=(1, 1))
    t = torch.nn.functional.interpolate(t, size=size)
    return (t / t.amax(dim=(2, 3), keepdim=True)).gt(threshold).numpy()[:, 0]


def test_local_blend_mask_equals_torch_pool_interpolate_threshold():
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, (2, 4, 4, 6)).astype(np.float32) ** 6  # peaked, so the threshold splits them
    words = np.zeros((2, 6), np.float32)
    words[0, 2], words[1, [3, 4]] = 1, 1
    got = np.asarray(editing.local_blend_mask(jnp.asarray(maps), jnp.asarray(words), 0.3, (8, 8)))
    np.testing.assert_array_equal(got, _papers_mask(maps, words, 0.3, True, (8, 8)).astype(np.float32))
    assert 0 < got.mean() < 1


def _papers_get_mask(maps, words, threshold, use_pool, size):
    """The paper's code's ``LocalBlend.get_mask``: :func:`_papers_mask` united with the source's (row 0)."""
    m = _papers_mask(maps, words, threshold, use_pool, size)
    return m[:1] | m


def test_subtracted_words_take_their_cells_out_as_the_papers_code():
    rng = np.random.default_rng(4)
    maps = rng.uniform(0, 1, (3, 4, 4, 6)).astype(np.float32) ** 4
    words, sub = np.zeros((3, 6), np.float32), np.zeros((3, 6), np.float32)
    words[:, 1], words[2, 2], sub[:, 4] = 1, 1, 1
    blend = editing.LocalBlend(jnp.asarray(words), jnp.asarray(0.1), jnp.asarray(1.0), jnp.asarray(0.0),
                               jnp.asarray(sub), jnp.asarray(0.4), jnp.asarray(0))
    got = np.asarray(blend.mask(jnp.asarray(maps), (8, 8)))
    add = _papers_get_mask(maps, words, 0.1, True, (8, 8))
    want = add & ~_papers_get_mask(maps, sub, 0.4, False, (8, 8))  # mask * ~get_mask(substruct, use_pool=False)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert 0 < got[1:].mean() < add[1:].mean()  # the subtraction acts, and leaves some of the mask
    no_sub = editing.LocalBlend(jnp.asarray(words), jnp.asarray(0.1), jnp.asarray(1.0), jnp.asarray(0.0),
                                jnp.asarray(sub * 0), jnp.asarray(0.4), jnp.asarray(0))
    np.testing.assert_array_equal(np.asarray(no_sub.mask(jnp.asarray(maps), (8, 8))), add.astype(np.float32))


def test_blend_acts_from_its_start_step():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 1)), jnp.float32)
    maps = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 4, 4, 3)), jnp.float32)
    blend = editing.LocalBlend(jnp.ones((2, 3)), jnp.asarray(2.0), jnp.asarray(1.0), start=jnp.asarray(3))
    out, mask = blend(x, maps, jnp.asarray(2))  # before the start: untouched, and no mask
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    assert np.all(np.asarray(mask) == 1)
    out, mask = blend(x, maps, jnp.asarray(3))  # from it: nothing exceeds 2 x max, so the source everywhere
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x)[[0, 0]])
    assert np.all(np.asarray(mask) == 0)


def test_edit_blends_from_blend_start_and_subtracts_words(tiny):
    _, _, sd = tiny
    edited = editing.edit(sd, SRC, TGT, **KW)
    never = editing.edit(sd, SRC, TGT, blend_words=WORDS, blend_threshold=2.0, blend_start=1.0, **KW)  # 2 steps
    np.testing.assert_allclose(never.images, edited.images, atol=1e-6, rtol=0)
    last = editing.edit(sd, SRC, TGT, blend_words=WORDS, blend_threshold=2.0, blend_start=0.5, **KW)  # step 1 only
    np.testing.assert_array_equal(last.images[1], last.images[0])
    emptied = editing.edit(sd, SRC, TGT, blend_words=WORDS, blend_subtract=["photo"], blend_threshold=(-1.0, -1.0),
                           **KW)  # every cell is in the mask, and every cell is subtracted
    assert np.all(emptied.mask == 0)
    np.testing.assert_array_equal(emptied.images[1], emptied.images[0])
    kept = editing.edit(sd, SRC, TGT, blend_words=WORDS, blend_subtract="photo", blend_threshold=(-1.0, 2.0), **KW)
    np.testing.assert_allclose(kept.images, edited.images, atol=1e-6, rtol=0)
    for kw, message in ((dict(blend_subtract=["photo"]), "give blend_words"),
                        (dict(blend_words=WORDS, blend_subtract=["tree"]), "none of the subtracted words"),
                        (dict(blend_words=WORDS, blend_threshold=(0.3, 0.3, 0.3)), "one number or two"),
                        (dict(blend_words=WORDS, blend_start=1.5), "blend_start is a fraction")):
        with pytest.raises(ValueError, match=message):
            editing.edit(sd, SRC, TGT, **{**KW, **kw})


def test_minmax_blend_normalisation_finds_the_object_on_a_uniform_floor():
    """Maps that follow the object only as a small bump on a uniform floor (digits-sd's): the paper's ``m / max``
    puts every cell above the threshold; ``(m - min) / (max - min)`` (``subtract_min=1``) recovers the object."""
    obj = np.zeros((1, 6, 6), np.float32)
    obj[0, 2:4, 1:5] = 1.0
    maps = (1.0 + 0.2 * obj)[..., None]  # (P, h, w, T = 1)
    words = jnp.ones((1, 1))
    paper = editing.local_blend_mask(jnp.asarray(maps), words, 0.3, None, k=0)
    minmax = editing.local_blend_mask(jnp.asarray(maps), words, 0.3, None, k=0, subtract_min=1.0)
    assert np.all(np.asarray(paper) == 1)
    np.testing.assert_array_equal(np.asarray(minmax), obj)
    blend = editing.LocalBlend(words.repeat(2, 0), jnp.asarray(0.3), jnp.asarray(1.0), jnp.asarray(1.0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 6, 1)), jnp.float32)
    out, mask = blend(x, jnp.asarray(np.repeat(maps, 2, 0)))  # k = 1: the object dilated by one cell
    assert 0 < float(mask[1].mean()) < 1
    outside = np.asarray(mask[1]) == 0
    np.testing.assert_array_equal(np.asarray(out)[1][outside], np.asarray(x)[0][outside])


def test_blend_mixes_only_the_edited_rows_with_the_union_of_masks():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 1)), jnp.float32)
    maps = np.zeros((2, 2, 2, 3), np.float32)
    maps[0, 0, 0, 1], maps[1, 1, 1, 2] = 1.0, 1.0  # the source's word top-left, the target's bottom-right
    words = np.array([[0, 1, 0], [0, 0, 1]], np.float32)
    blend = editing.LocalBlend(jnp.asarray(words), jnp.asarray(1.5), jnp.asarray(1.0))
    # a 3x3 max-pool on a 2x2 grid spreads each peak everywhere: a threshold above 1 leaves no mask ...
    out, mask = blend(x, jnp.asarray(maps))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x)[[0, 0]])
    m = editing.local_blend_mask(jnp.asarray(maps), jnp.asarray(words), 0.5, None, k=0)  # ... no pooling does
    np.testing.assert_array_equal(np.asarray(m), [[[1, 0], [0, 0]], [[0, 0], [0, 1]]])


def _probs(shape, seed):
    a = np.random.default_rng(seed).uniform(0.1, 1, shape).astype(np.float32)
    return a / a.sum(-1, keepdims=True)


def test_cross_edit_is_the_papers_replace_refine_and_reweight():
    p = _probs((4, 2, 3, 5), 0)  # rows: source, edit, uncond, uncond
    mapper = np.array([np.arange(5), [0, 1, 1, 2, 4], np.arange(5), np.arange(5)])
    alphas = np.array([np.zeros(5), [1, 1, 0, 1, 1], np.zeros(5), np.zeros(5)], np.float32)
    factors = np.ones((4, 5), np.float32)
    factors[1, 2] = 3.0
    c = editing.CrossEdit(jnp.asarray([0, 0, 2, 3]), jnp.asarray(mapper), jnp.asarray(alphas), jnp.asarray(factors))
    got = np.asarray(c.edit(jnp.asarray(p)))
    want = p.copy()
    for j in range(5):  # target token j reads source token A(j), or keeps its own map (j = 2: a new token)
        want[1, ..., j] = (p[0, ..., mapper[1, j]] if alphas[1, j] else p[1, ..., j]) * factors[1, j]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got[[0, 2, 3]], p[[0, 2, 3]])  # unedited rows exactly unchanged


def test_refinement_alignment_worked_example():
    # source  <s> a  cat  </s>        target  <s> a  fat  cat  </s>
    # The paper's A: <s> -> 0, a -> 1, fat -> None (new), cat -> 2, </s> -> 3.
    assert editing.align_tokens([0, 10, 20, 1], [0, 10, 30, 20, 1]) == [0, 1, None, 2, 3]
    # a swapped word is a new token (a gap costs 0, a mismatch -1): "a cat" -> "a dog" keeps the dog's own map
    assert editing.align_tokens([0, 10, 20, 1], [0, 10, 40, 1]) == [0, 1, None, 3]
    # a removed word: "a fat cat" -> "a cat"
    assert editing.align_tokens([0, 10, 30, 20, 1], [0, 10, 20, 1]) == [0, 1, 3, 4]


def test_refine_mapper_and_word_positions_on_the_clip_tokenizer(tiny):
    _, _, sd = tiny
    mapper, alphas = editing.refine_mapper(sd.tokenizer, "a cat on a mat", "a fat cat on a mat", 77)
    np.testing.assert_array_equal(mapper[:8], [0, 1, 2, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(alphas[:8], [1, 1, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(mapper[8:], np.arange(8, 77))  # padding reads the same position
    assert editing.word_positions(sd.tokenizer, "number 7, thin", "7") == [2]  # not the comma (3)
    assert editing.word_positions(sd.tokenizer, "number 7, thin", "thin") == [4]
    assert editing.word_positions(sd.tokenizer, "a Cat, a cat", "cat") == [2, 5]
    with pytest.raises(ValueError, match="refine"):
        editing.swap_mapper(sd.tokenizer, "a cat", "a fat cat", 77)


def test_per_step_unconditional_embeddings_hook(tiny):
    """Step i reads embedding i for every row (checked on the program's own function, without compiling a second
    edit program); shapes other than (steps, L, D) are refused."""
    _, _, sd = tiny
    emb = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 4)
    s = editing.EditSettings(*(None,) * 9)
    s = editing.dataclasses.replace(s, uncond=emb)
    got = editing._per_step_uncond(None, s, jnp.asarray(1), 2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(emb)[[1, 1]])
    with pytest.raises(ValueError, match="one per step"):
        editing.edit(sd, SRC, TGT, uncond_embeddings=np.zeros((1, 77, 32), np.float32), **KW)


def test_self_injection_sites_follow_the_papers_token_limit(tiny):
    _, _, sd = tiny
    assert editing.unet_grids(sd, 16, 16) == [(8, 8), (4, 4)]
    assert editing.blend_resolution(sd, 16, 16) == (8, 8)  # the grid nearest the paper's 16 x 16
    assert editing.blend_resolution(sd, 64, 64) == (16, 16)
    s, mode = editing.edit_settings(sd, [SRC, TGT], seed=0, steps=10, guidance=7.5, cross_steps=0.8, self_steps=0.4,
                                    mode="auto", blend_words=None, blend_threshold=0.3, reweight={"dog": 2.0},
                                    record_words=[], negative="", latents=None, uncond_embeddings=None,
                                    height=64, width=64)
    assert mode == "replace"
    grids = [c.where.resolution for c in s.self_replace.items]
    assert grids == [(16, 16)]  # the 32 x 32 grid has 1024 query tokens, above the paper's 256
    assert int(s.cross.steps.stop) == 8 and int(s.self_replace.items[0].steps.stop) == 4
    np.testing.assert_array_equal(np.asarray(s.cross.source), [0, 0, 2, 3])
    assert float(s.cross.factors[1, 5]) == 2.0 and float(s.cross.factors.sum()) == 4 * 77 + 1
