"""`jaxdiff edit` on digits-sd: the PNGs equal the Python API's edit with the same settings and carry them; the
maps grid has a row per prompt and a column per word; a real image (--image) is reconstructed by its inversion;
bad options fail with one line (exit 2) and write nothing."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import main
from jaxdiff.images import read_settings, to_uint8

SRC = "number seven, thick, in red on black, upright"
TGT = "number seven, thick, in blue on black, upright"


def test_edit_writes_the_apis_source_edit_and_maps(tmp_path, capsys):
    from jaxdiff import builtin, editing

    out = tmp_path / "edit.png"
    argv = ["edit", "--model", "digits-sd", "--prompt", SRC, "--target", TGT, "--blend", "red", "blue",
            "--reweight", "thick=2", "--cross-steps", "0.5", "--self-steps", "0.5", "--steps", "3", "--seed", "4",
            "--out", str(out), "--attention-maps", str(tmp_path / "maps.png")]
    assert main(argv) == 0
    want = editing.edit(builtin.load_pipeline("digits-sd"), SRC, TGT, seed=4, steps=3, cross_steps=0.5,
                        self_steps=0.5, blend_words=["red", "blue"], reweight={"thick": 2.0})
    edit, source = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "edit-source.png"))
    np.testing.assert_array_equal(edit, to_uint8(want.images[1]))
    np.testing.assert_array_equal(source, to_uint8(want.images[0]))
    s = read_settings(out)
    assert s["prompt"] == [TGT] and s["source_prompt"] == SRC and s["reweight"] == {"thick": 2.0}
    assert s["blend"] == ["red", "blue"] and s["mode"] == "replace" and s["cross_steps"] == 0.5
    maps = np.asarray(Image.open(tmp_path / "maps.png"))
    assert maps.shape == (2 * 32 + 1, 4 * 32 + 3, 3)  # rows: source, edit; columns: image, red, blue, thick
    assert maps[:32, 33:65].max() > 0 and maps[:32, 66:98].max() == 0  # "blue" is not in the source prompt


def test_edit_real_image_equals_the_api_reconstructs_it_and_records_its_sha256(tmp_path, capsys):
    """A held-out real digit, DDIM-inverted and edited at guidance 1 (so DDIM retraces the inversion): the source PNG
    is the image again, both PNGs are ``editing.edit_image``'s, and they name the image by its sha256."""
    from jaxdiff import builtin, editing
    from jaxdiff.cli import sha256
    from jaxdiff.data.digits_text import DIGIT_WORDS, load_digits_text
    from jaxdiff.images import load_image

    held = load_digits_text()["held_out"]
    caption, label = str(held["caption"][0]), int(held["label"][0])
    word = DIGIT_WORDS[label] if DIGIT_WORDS[label] in caption.split(" ") else str(label)
    new = (label + 3) % 10
    target = caption.replace(word, DIGIT_WORDS[new] if word.isalpha() else str(new), 1)
    real, out = tmp_path / "real.png", tmp_path / "edit.png"
    Image.fromarray(to_uint8(held["image"][0])).save(real)
    argv = ["edit", "--image", str(real), "--prompt", caption, "--target", target, "--inversion", "ddim",
            "--inversion-steps", "4", "--guidance", "1", "--out", str(out)]
    assert main(argv) == 0
    want = editing.edit_image(builtin.load_pipeline("digits-sd"), load_image(real), caption, target, steps=4,
                              guidance=1.0, inversion="ddim")
    source = np.asarray(Image.open(tmp_path / "edit-source.png"))
    np.testing.assert_array_equal(source, to_uint8(want.images[0]))
    np.testing.assert_array_equal(np.asarray(Image.open(out)), to_uint8(want.images[1]))
    mse = np.mean((source / 255.0 - load_image(real)) ** 2)
    assert -10 * np.log10(mse) > 20.0, -10 * np.log10(mse)  # the real digit, not a new one
    s = read_settings(out)
    assert s["real_image_sha256"] == sha256(real) and s["inversion"] == "ddim" and s["inversion_steps"] == 4
    assert s["sampler"] == "ddim" and s["steps"] == 4 and s["prompt"] == [target] and s["source_prompt"] == caption


@pytest.mark.parametrize("extra, message", [
    (["--reweight", "thick"], "WORD=FACTOR"),
    (["--out", "x.jpg"], "must end in .png"),
    (["--inversion", "ddim"], "give --image"),
    (["--image", "missing.png"], "missing.png does not exist"),
    (["--image", "missing.png", "--sampler", "euler"], "plain DDIM"),
    (["--image", "missing.png", "--inversion-steps", "3"], "--steps 2 and --inversion-steps 3 differ"),
])
def test_edit_refuses_bad_options(tmp_path, capsys, extra, message):
    argv = ["edit", "--prompt", SRC, "--target", TGT, "--steps", "2", "--out", str(tmp_path / "e.png"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
