"""digits-unclip (jaxdiff.pipelines.unclip_digits): the built-in folder loads, the text -> prior -> decoder program has
the right shapes at 2 steps, an image variation keeps the input's digit and new step counts / scales compile nothing,
and slerp keeps unit norm, hits its endpoints exactly and moves at constant angular speed."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipelines import unclip_digits as ud


@pytest.fixture(scope="module")
def pipe():
    return ud.load()


def test_slerp_keeps_unit_norm_hits_endpoints_and_moves_at_constant_speed():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 64)).astype(np.float32)
    t = np.linspace(0.0, 1.0, 9, dtype=np.float32)
    path = np.asarray(ud.slerp(a[:, None], b[:, None], t[None]))  # (5, 9, 64)
    np.testing.assert_allclose(np.linalg.norm(path, axis=-1), 1.0, atol=1e-5)
    ua, ub = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    assert np.array_equal(path[:, 0], np.asarray(ud.unit(jnp.asarray(a))))  # endpoints exact: the normalised ends
    assert np.array_equal(path[:, -1], np.asarray(ud.unit(jnp.asarray(b))))
    omega = np.arccos(np.sum(ua * ub, -1))  # the angle from a grows linearly in t (a great circle, constant speed)
    from_a = np.arccos(np.clip(np.sum(path * ua[:, None], -1), -1, 1))
    np.testing.assert_allclose(from_a, omega[:, None] * t[None], atol=2e-3)
    same = np.asarray(ud.slerp(ua[:1], ua[:1], jnp.asarray([0.3])))  # parallel ends: no 0/0
    np.testing.assert_allclose(same, ua[:1], atol=1e-6)


def test_builtin_folder_is_small_references_sd_and_clip_and_samples_at_the_right_shapes(pipe):
    folder = ud.builtin_path("digits-unclip")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 3 * 2**20
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"]["builtin"] == "digits-sd" and index["clip"]["builtin"] == "digits-clip"
    assert not list(folder.rglob("vae")) and "examples/unclip/train.py" in (folder / "training.json").read_text()
    ids = jnp.asarray(ud.tokenize(pipe.tokenizer, ["a red 3 on a white background", "number 7 in blue on yellow"],
                                  pipe.max_length))
    pp, dp = pipe.plans(2, 2)
    req = ud.UnCLIPRequest(jnp.arange(2, dtype=jnp.uint32), jnp.full((2,), 4.0), jnp.full((2,), 3.0), pp.sigmas,
                           dp.sigmas, ids=ids)
    images, z = jax.eval_shape(ud.generate, pipe.models, pp.sampler, dp.sampler, req)  # the whole 2-stage program
    assert images.shape == (2, 32, 32, 3) and z.shape == (2, 64) and images.dtype == jnp.float32


def test_variation_keeps_the_digit_and_new_steps_or_scales_compile_nothing(pipe):
    from jaxdiff.builtin import load_builtin
    from jaxdiff.data import load_digits_text
    from jaxdiff.data.digits_text import judge_input

    held = load_digits_text()["held_out"]
    pick = np.asarray([0, 1, 2, 3])
    out, z = pipe.variations(held["image"][pick], seed=0, decoder_steps=10, return_embeddings=True)
    assert out.shape == (4, 32, 32, 3) and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(z, pipe.embed_images(held["image"][pick]), atol=1e-5)  # the inputs' embeddings
    from jaxdiff.pipelines import unclip_digits

    compiled = unclip_digits._embed_images_jit._cache_size()
    pipe.embed_images(held["image"][pick[::-1]])  # other images of the same shape: the same program
    assert unclip_digits._embed_images_jit._cache_size() == compiled
    judge = load_builtin("digits-eval")
    labels = np.argmax(np.asarray(judge(jnp.asarray(judge_input(out), jnp.float32))), -1)
    assert np.mean(labels == held["label"][pick]) >= 0.75
    assert not np.allclose(out, held["image"][pick], atol=0.05)  # a variation, not a copy
    before = ud.generate_jit._cache_size()
    again = pipe.variations(held["image"][pick], seed=0, decoder_steps=6, decoder_guidance=2.0)
    assert ud.generate_jit._cache_size() == before and not np.allclose(again, out)


def test_image_projection_is_the_image_half_of_unclip_text_proj():
    """Same names, same (cross_attention_dim, tokens) layout of the extra-token projection: with the text half of
    UnCLIPTextProjModel at zero (its parity with diffusers is tested in tests/models), both give the same context
    tokens and time addition."""
    from flax import nnx

    from jaxdiff.models.unclip_image_proj import UnCLIPImageProj, UnCLIPImageProjConfig, select_embeddings
    from jaxdiff.models.unclip_text_proj import UnCLIPTextProjConfig, UnCLIPTextProjModel

    mine = UnCLIPImageProj(UnCLIPImageProjConfig(8, 12, 6, 3), rngs=nnx.Rngs(0))
    full = UnCLIPTextProjModel(UnCLIPTextProjConfig(3, 8, 12, 6), rngs=nnx.Rngs(1))
    mine.learned_classifier_free_guidance_embeddings[...] = jnp.arange(8.0)
    for name in ("learned_classifier_free_guidance_embeddings", "clip_image_embeddings_project_to_time_embeddings",
                 "clip_extra_context_tokens_proj"):
        setattr(full, name, getattr(mine, name))
    full.embedding_proj.kernel[...] = jnp.zeros_like(full.embedding_proj.kernel[...])
    full.embedding_proj.bias[...] = jnp.zeros_like(full.embedding_proj.bias[...])
    z = jax.random.normal(jax.random.key(0), (2, 8))
    tokens, time_add = mine(z)
    context, additive = full(z, jnp.zeros((2, 8)), jnp.zeros((2, 1, 8)))
    np.testing.assert_allclose(tokens, context[:, :3], atol=1e-6)
    np.testing.assert_allclose(time_add, additive, atol=1e-6)
    dropped = select_embeddings(mine, z, jnp.asarray([True, False]))  # classifier-free dropout -> the null vector
    np.testing.assert_array_equal(dropped[0], z[0])
    np.testing.assert_array_equal(dropped[1], full.null_image_embeddings(1)[0])


def test_cli_samples_digits_unclip_by_name(pipe, tmp_path, capsys):
    """``jaxdiff sample --model digits-unclip``: prompts through prior and decoder give the pipeline's images for the
    same settings (defaults: prior guidance 4, decoder guidance 3); options it has no stage for are refused."""
    from PIL import Image

    from jaxdiff import cli

    prompts = ["a red 3 on a white background", "number 7 in blue on yellow"]
    want = pipe(prompts, seed=5, prior_steps=2, decoder_steps=2)
    out = tmp_path / "u.png"
    args = ["sample", "--model", "digits-unclip", "--prompt", prompts[0], "--prompt", prompts[1], "--prior-steps", "2",
            "--steps", "2", "--seed", "5", "--out", str(out)]
    assert cli.main(args) == 0
    for i in range(2):
        png = np.asarray(Image.open(tmp_path / f"u-{i:03d}.png"), np.float32) / 255.0
        np.testing.assert_allclose(png, want[i], atol=0.5 / 255 + 1e-4)
    capsys.readouterr()
    assert cli.main(args[:-2] + ["--super-res-steps", "2"]) == 2
    assert "--super-res-steps" in capsys.readouterr().err
