"""Prompt-to-Prompt on real images (jaxdiff.editing.edit_image, Mokady et al. 2023 Sec. 4) on digits-sd and a held-out
real digit: the edit's source row is null_text.reconstruct's image of the same inverted latents and per-step
embeddings, the embeddings reach the unconditional half only, zero injection is plain sampling of the target from the
inverted latents, and `jaxdiff edit --image` writes the API's images, the real image again at guidance 1.

One module, so that the CLI's run and the API's calls share the compiled programs (DDIM inversion, the edit at 4 steps
with per-step embeddings, the recipe's reconstruction). What stands in for null-text inversion's output (its program
costs more than this whole file): the digit's DDIM inversion with a different caption's embedding at each step (any
per-step embeddings take the same path as optimised ones; the optimisation is tested in tests/test_null_text.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from jaxdiff import editing
from jaxdiff import null_text as nt
from jaxdiff.images import load_image, read_settings, to_uint8

STEPS = 4
KW = dict(guidance=7.5, mesh=None)
TOL = dict(atol=1e-4, rtol=0)  # float rounding (programs fused differently), amplified by guidance 7.5


@pytest.fixture(scope="module")
def sd():
    from jaxdiff import builtin

    return builtin.load_pipeline("digits-sd")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A held-out real digit as a PNG, its caption, the caption with the digit swapped, and other captions."""
    from jaxdiff.data.digits_text import DIGIT_WORDS, load_digits_text

    held = load_digits_text()["held_out"]
    caption, label = str(held["caption"][0]), int(held["label"][0])
    word = DIGIT_WORDS[label] if DIGIT_WORDS[label] in caption.split(" ") else str(label)
    new = (label + 3) % 10
    target = caption.replace(word, DIGIT_WORDS[new] if word.isalpha() else str(new), 1)
    path = tmp_path_factory.mktemp("real_edit") / "real.png"
    Image.fromarray(to_uint8(held["image"][0])).save(path)
    return dict(path=path, image=load_image(path), caption=caption, target=target,
                others=[str(c) for c in held["caption"][1: 1 + STEPS]])


@pytest.fixture(scope="module")
def ddim(sd, real):
    return editing.invert_image(sd, real["image"], real["caption"], steps=STEPS, inversion="ddim")


@pytest.fixture(scope="module")
def null(sd, real, ddim):
    """The DDIM-inverted latents with another caption's embedding at each step (``null_text.invert``'s shape)."""
    return dataclasses.replace(ddim, uncond=np.asarray(sd.encode_prompt(real["others"]))[None], method="null-text")


@pytest.fixture(scope="module")
def same(sd, real, null):
    """Target = source with every injection on: both rows are the reconstruction."""
    return editing.edit_image(sd, None, real["caption"], real["caption"], inverted=null, cross_steps=1.0,
                              self_steps=1.0)


def test_ddim_inversion_is_the_pivot_start_with_the_empty_prompt_at_every_step(sd, real, ddim):
    np.testing.assert_array_equal(ddim.latents, nt.ddim_invert(sd, real["image"], real["caption"], steps=STEPS))
    empty = np.asarray(sd.encode_prompt([""]))[0]
    assert ddim.uncond.shape == (1, STEPS) + empty.shape
    np.testing.assert_array_equal(ddim.uncond, np.broadcast_to(empty, ddim.uncond.shape))


def test_target_equal_to_source_reproduces_null_text_reconstruct(sd, real, null, same):
    rec = nt.reconstruct(sd, null.latents, real["caption"], null.uncond, **KW)
    assert rec.std() > 0.05
    np.testing.assert_allclose(same.images[0], rec[0], **TOL)
    np.testing.assert_array_equal(same.images[1], same.images[0])
    assert same.inversion is null


def test_per_step_embeddings_reach_the_unconditional_half(sd, real, ddim, null, same):
    """The DDIM inversion's edit (the empty prompt at every step) reconstructs as the recipe's plain CFG from its
    latents; the per-step embeddings move the image; at guidance 1 (no unconditional half) they change nothing."""
    c = real["caption"]
    plain = editing.edit_image(sd, None, c, c, inverted=ddim, cross_steps=1.0, self_steps=1.0)
    empty = np.broadcast_to(np.asarray(sd.encode_prompt([""]))[None], null.uncond.shape)
    rec = nt.reconstruct(sd, ddim.latents, c, empty, **KW)  # = the recipe's plain CFG: tests/test_null_text.py
    np.testing.assert_allclose(plain.images[0], rec[0], **TOL)
    assert np.abs(same.images[0] - plain.images[0]).max() > 0.05
    one = [editing.edit_image(sd, None, c, c, inverted=dataclasses.replace(i, method="ddim"), guidance=1.0,
                              cross_steps=1.0, self_steps=1.0) for i in (ddim, null)]
    np.testing.assert_allclose(one[0].images, one[1].images, **TOL)


def test_zero_injection_is_sampling_the_target_from_the_inverted_latents(sd, real, null, same):
    out = editing.edit_image(sd, None, real["caption"], real["target"], inverted=null, cross_steps=0.0,
                             self_steps=0.0)
    rec = nt.reconstruct(sd, null.latents, real["target"], null.uncond, **KW)
    np.testing.assert_allclose(out.images[1], rec[0], **TOL)
    np.testing.assert_array_equal(out.images[0], same.images[0])  # the source row is never edited
    assert np.abs(out.images[1] - out.images[0]).max() > 0.05


def test_cli_edits_a_real_image_as_the_api_reconstructs_it_and_records_its_sha256(sd, real, tmp_path):
    """DDIM inversion and the edit at guidance 1, where DDIM retraces the inversion: the source PNG is the real digit
    again (not a new one), both PNGs are ``edit_image``'s, and they name the image by its sha256."""
    from jaxdiff.cli import main, sha256

    out = tmp_path / "edit.png"
    argv = ["edit", "--image", str(real["path"]), "--prompt", real["caption"], "--target", real["target"],
            "--inversion", "ddim", "--inversion-steps", str(STEPS), "--guidance", "1", "--out", str(out)]
    assert main(argv) == 0
    want = editing.edit_image(sd, real["image"], real["caption"], real["target"], steps=STEPS, guidance=1.0,
                              inversion="ddim")
    source = np.asarray(Image.open(tmp_path / "edit-source.png"))
    np.testing.assert_array_equal(source, to_uint8(want.images[0]))
    np.testing.assert_array_equal(np.asarray(Image.open(out)), to_uint8(want.images[1]))
    psnr = -10 * np.log10(np.mean((source / 255.0 - real["image"]) ** 2))
    assert psnr > 20.0, psnr
    s = read_settings(out)
    assert s["real_image_sha256"] == sha256(real["path"]) and s["inversion"] == "ddim"
    assert s["inversion_steps"] == STEPS and s["sampler"] == "ddim" and s["steps"] == STEPS
    assert s["prompt"] == [real["target"]] and s["source_prompt"] == real["caption"]
    assert read_settings(tmp_path / "edit-source.png")["image"] == "reconstruction"


@pytest.mark.parametrize("kw, message", [
    (dict(steps=5), f"inverted with {STEPS} steps"),
    (dict(guidance=5.0), "optimised for guidance 7.5"),
    (dict(image=np.zeros((32, 32, 3), np.float32)), "not both"),
])
def test_mismatched_inversion_is_refused(sd, real, null, kw, message):
    kw = {"image": None, **kw}
    with pytest.raises(ValueError, match=message):
        editing.edit_image(sd, kw.pop("image"), real["caption"], real["target"], inverted=null, **kw)


def test_batch_inversion_is_refused_and_indexed(sd, real, null):
    two = dataclasses.replace(null, latents=np.repeat(null.latents, 2, 0), uncond=np.repeat(null.uncond, 2, 0))
    with pytest.raises(ValueError, match=r"inverted\[i\]"):
        editing.edit_image(sd, None, real["caption"], real["target"], inverted=two)
    np.testing.assert_array_equal(two[1].uncond, null.uncond)
    with pytest.raises(ValueError, match="inversion must be one of"):
        editing.invert_image(sd, real["image"], real["caption"], inversion="pti")
