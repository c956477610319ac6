"""Prompt-to-Prompt on real images (jaxdiff.editing.edit_image, Mokady et al. 2023 Sec. 4) on the tiny random SD: the
edit's source row is null_text.reconstruct's image of the same inverted latents and per-step embeddings, the embeddings
reach the unconditional half only, and zero injection is plain sampling of the target from the inverted latents.

What stands in for the inversions' outputs (their compiled programs cost more than this whole file): random x_T
latents with the empty prompt's embedding at every step (DDIM inversion) or a different prompt's embedding at each
step (null-text inversion; any per-step embeddings take the same path as optimised ones). The inversions themselves
are tested in tests/test_null_text.py, and ``invert_image`` + ``edit_image`` on a real digit in
tests/test_cli_edit.py (the round trip through the CLI)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdiff import editing
from jaxdiff import null_text as nt

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
import _tiny_sd  # noqa: E402

STEPS = 3
SRC, TGT = "a b", "a c"
IMAGE = np.random.default_rng(0).uniform(0.0, 1.0, (8, 8, 3)).astype(np.float32)
LATENTS = np.random.default_rng(1).normal(size=(1, 4, 4, 4)).astype(np.float32)  # x_T, VP scale
KW = dict(guidance=7.5, mesh=None)
EDIT = dict(record_words=["a"])  # one recorded word in every call: one compiled edit program


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _tiny_sd.build(tmp_path_factory.mktemp("tiny_real_edit"))


@pytest.fixture(scope="module")
def ddim(sd):
    """What ``invert_image(..., inversion="ddim")`` returns for an image whose DDIM inversion is ``LATENTS``: the
    empty prompt's embedding at every step."""
    empty = np.asarray(sd.encode_prompt([""]))
    return editing.Inversion(LATENTS, np.broadcast_to(empty[None], (1, STEPS) + empty.shape[1:]).copy(), "ddim", 7.5)


@pytest.fixture(scope="module")
def null(sd, ddim):
    """The same latents with a different unconditional embedding at each step (``null_text.invert``'s shape)."""
    uncond = np.asarray(sd.encode_prompt(["d e", "c", "b d"]))[None]
    return dataclasses.replace(ddim, uncond=uncond, method="null-text")


@pytest.fixture(scope="module")
def same(sd, null):
    """Target = source with every injection on: both rows are the reconstruction."""
    return editing.edit_image(sd, None, SRC, SRC, inverted=null, cross_steps=1.0, self_steps=1.0, **EDIT)


def test_target_equal_to_source_reproduces_null_text_reconstruct(sd, null, same):
    rec = nt.reconstruct(sd, null.latents, SRC, null.uncond, **KW)
    assert rec.std() > 0.01
    np.testing.assert_allclose(same.images[0], rec[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(same.images[1], same.images[0])
    assert same.inversion is null


def test_per_step_embeddings_reach_the_unconditional_half(sd, ddim, null, same):
    """The DDIM inversion's edit (the empty prompt at every step) reconstructs as the recipe's plain CFG from its
    latents; the per-step embeddings of ``null`` move the image; at guidance 1 (no unconditional half) they don't."""
    plain = editing.edit_image(sd, None, SRC, SRC, inverted=ddim, cross_steps=1.0, self_steps=1.0, **EDIT)
    empty = np.broadcast_to(np.asarray(sd.encode_prompt([""]))[None], null.uncond.shape)
    rec = nt.reconstruct(sd, ddim.latents, SRC, empty, **KW)  # = plain CFG: tests/test_null_text.py
    np.testing.assert_allclose(plain.images[0], rec[0], atol=1e-5, rtol=0)
    assert np.abs(same.images[0] - plain.images[0]).max() > 2e-4  # 20 x the tolerance above (a tiny random model: prompts move it little)
    one = [editing.edit_image(sd, None, SRC, SRC, inverted=dataclasses.replace(i, method="ddim"), guidance=1.0,
                              cross_steps=1.0, self_steps=1.0, **EDIT) for i in (ddim, null)]
    np.testing.assert_allclose(one[0].images, one[1].images, atol=1e-6, rtol=0)


def test_zero_injection_is_sampling_the_target_from_the_inverted_latents(sd, null, same):
    out = editing.edit_image(sd, None, SRC, TGT, inverted=null, cross_steps=0.0, self_steps=0.0, **EDIT)
    rec = nt.reconstruct(sd, null.latents, TGT, null.uncond, **KW)
    np.testing.assert_allclose(out.images[1], rec[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.images[0], same.images[0])  # the source row is never edited
    assert np.abs(out.images[1] - out.images[0]).max() > 2e-4


@pytest.mark.parametrize("kw, message", [
    (dict(steps=4), "inverted with 3 steps"),
    (dict(guidance=5.0), "optimised for guidance 7.5"),
    (dict(image=IMAGE), "not both"),
])
def test_mismatched_inversion_is_refused(sd, null, kw, message):
    kw = {"image": None, **kw}
    with pytest.raises(ValueError, match=message):
        editing.edit_image(sd, kw.pop("image"), SRC, TGT, inverted=null, **kw)


def test_batch_inversion_is_refused_and_indexed(sd, null):
    two = dataclasses.replace(null, latents=np.repeat(null.latents, 2, 0), uncond=np.repeat(null.uncond, 2, 0))
    with pytest.raises(ValueError, match=r"inverted\[i\]"):
        editing.edit_image(sd, None, SRC, TGT, inverted=two)
    np.testing.assert_array_equal(two[1].uncond, null.uncond)
    with pytest.raises(ValueError, match="inversion must be one of"):
        editing.invert_image(sd, IMAGE, SRC, inversion="pti")
