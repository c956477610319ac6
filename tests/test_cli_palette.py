"""`jaxdiff sample --model digits-palette`: inpainting from PNG files, settings recorded, clear errors."""
import json

import numpy as np
from PIL import Image

from jaxdiff.cli import main
from jaxdiff.images import read_settings
from jaxdiff.train import load_digits_dataset


def test_inpaint_from_png_files(tmp_path, capsys):
    x = load_digits_dataset()[1]["x"][0, ..., 0]
    Image.fromarray(np.round((x + 1) * 127.5).astype(np.uint8)).save(tmp_path / "x.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out.png"
    args = ["sample", "--model", "digits-palette", "--init-image", str(tmp_path / "x.png"), "--task", "inpaint",
            "--mask", str(tmp_path / "m.png"), "--steps", "3", "--num", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["task"] == "inpaint" and printed["steps"] == 3
    assert read_settings(out)["mask"] == str(tmp_path / "m.png")
    grid = np.asarray(Image.open(out))
    assert grid.shape == (32, 3 * 32 + 2 * 4)  # the source, then two draws, each 8x8 shown 4x
    draw = grid[:, 36:68][::4, ::4].astype(np.float32) / 127.5 - 1.0
    keep = mask == 0
    assert np.abs(draw[keep] - x[keep]).max() < 0.02  # the known pixels are the init image's
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), grid)  # --from-png reproduces the run


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "--model", "digits-palette", "--out", str(tmp_path / "o.png")]) == 2
    assert "--init-image" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    assert main(["sample", "--model", "digits-palette", "--init-image", str(tmp_path / "x.png"), "--label", "3",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--label does not apply" in capsys.readouterr().err
