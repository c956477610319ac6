"""`jaxdiff edit` on digits-sd: the PNGs equal the Python API's edit with the same settings and carry them; the
maps grid has a row per prompt and a column per word; bad options fail with one line (exit 2) and write nothing.
``--image`` (a real image) is tested in tests/test_editing_real.py, beside the API it shares compiled programs with."""
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
            "--blend-subtract", "black", "--blend-threshold", "0.3", "0.95", "--reweight", "thick=2",
            "--cross-steps", "0.5", "--self-steps", "0.5", "--steps", "3", "--seed", "4",
            "--out", str(out), "--attention-maps", str(tmp_path / "maps.png")]
    assert main(argv) == 0
    want = editing.edit(builtin.load_pipeline("digits-sd"), SRC, TGT, seed=4, steps=3, cross_steps=0.5,
                        self_steps=0.5, blend_words=["red", "blue"], blend_subtract=["black"],
                        blend_threshold=(0.3, 0.95), reweight={"thick": 2.0})
    assert 0 < want.mask[1].mean() < 1  # the background's word took cells out of the mask
    edit, source = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "edit-source.png"))
    np.testing.assert_array_equal(edit, to_uint8(want.images[1]))
    np.testing.assert_array_equal(source, to_uint8(want.images[0]))
    s = read_settings(out)
    assert s["prompt"] == [TGT] and s["source_prompt"] == SRC and s["reweight"] == {"thick": 2.0}
    assert s["blend"] == ["red", "blue"] and s["mode"] == "replace" and s["cross_steps"] == 0.5
    assert s["blend_subtract"] == ["black"] and s["blend_threshold"] == [0.3, 0.95] and s["blend_start"] == 0.2
    maps = np.asarray(Image.open(tmp_path / "maps.png"))
    assert maps.shape == (2 * 32 + 1, 4 * 32 + 3, 3)  # rows: source, edit; columns: image, red, blue, thick
    assert maps[:32, 33:65].max() > 0 and maps[:32, 66:98].max() == 0  # "blue" is not in the source prompt


@pytest.mark.parametrize("extra, message", [
    (["--reweight", "thick"], "WORD=FACTOR"),
    (["--out", "x.jpg"], "must end in .png"),
    (["--blend-composite"], "give --blend WORDS"),
    (["--blend-subtract", "black"], "--blend-subtract takes cells out"),
    (["--blend", "red", "--blend-threshold", "0.1", "0.2", "0.3"], "takes one value, or two"),
    (["--blend", "red", "--blend-start", "2"], "--blend-start is a fraction"),
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
