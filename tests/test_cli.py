"""The jaxdiff command line: built-in mixture, Stable Diffusion folders, PNG settings and --from-png, errors."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import main
from jaxdiff.images import read_settings

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))


def test_mixture2d_still_samples(tmp_path, capsys):
    out = tmp_path / "mix.png"
    args = ["sample", "--model", "mixture2d", "--num", "64", "--steps", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert out.is_file() and Image.open(out).size[0] > 100
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4


def test_unknown_model_lists_the_builtin_names(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nothing"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "mixture2d" in err


def test_info_lists_devices(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["devices"] and "dpmpp_2m" in info["samplers"] and "mixture2d" in info["models"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import _sd_folders

    pipe = _sd_folders.build_pipeline(blocks=(8,), vae_blocks=(8, 8))
    return _sd_folders.save(pipe, tmp_path_factory.mktemp("cli") / "tiny-sd")


def test_sample_writes_pngs_with_settings_and_reproduces_them(sd_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n")
    out = tmp_path / "run" / "grid.png"
    args = ["sample", "--model", str(sd_folder), "--prompt", "a photo of a cat", "--prompts-file", str(prompts),
            "--steps", "2", "--sampler", "ddim", "--guidance", "5", "--seed", "7", "--height", "16", "--width", "16",
            "--negative", "blurry", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    singles = sorted(out.parent.glob("grid-*.png"))
    assert [p.name for p in singles] == ["grid-000.png", "grid-001.png"]
    grid = read_settings(out)
    assert grid["prompt"] == ["a photo of a cat", "a red car"] and grid["seed"] == [7, 8]
    s = read_settings(singles[1])
    assert (s["prompt"], s["seed"], s["sampler"], s["steps"], s["guidance"], s["negative"]) == (
        ["a red car"], [8], "ddim", 2, 5.0, "blurry")
    assert s["height"] == 16 and "jaxdiff_version" in s and s["model"] == str(Path(sd_folder).resolve())
    assert Image.open(singles[1]).text["sampler"] == "ddim"  # each setting also has its own text chunk
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(singles[1]), "--out", str(again), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(singles[1])))
    assert read_settings(again)["prompt"] == ["a red car"]



def test_info_summarises_a_folder(sd_folder, capsys):
    assert main(["info", "--model", str(sd_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    comps = info["model"]["components"]
    assert comps["unet"]["class"] == "UNet2DConditionModel" and comps["unet"]["parameters"] > 1000
    assert comps["scheduler"]["steps_offset"] == 1 and "missing" not in info["model"]


def test_cli_errors_for_bad_sd_input(sd_folder, tmp_path, capsys):
    base = ["sample", "--model", str(sd_folder), "--prompt", "a", "--steps", "2", "--no-progress"]
    assert main(base + ["--height", "15", "--width", "16"]) == 2
    assert "multiple of 2" in capsys.readouterr().err
    assert main(base + ["--mask", str(tmp_path / "m.png")]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
    broken = shutil.copytree(sd_folder, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    assert main(["sample", "--model", str(broken), "--prompt", "a"]) == 2
    assert "vae" in capsys.readouterr().err
    png = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(png)
    assert main(["sample", "--from-png", str(png)]) == 2
    assert "no jaxdiff settings" in capsys.readouterr().err


def test_builtin_models_dispatch_to_sample_builtin(tmp_path, monkeypatch):
    import types

    calls = []

    def sample_builtin(name, *, num, seed, progress, **options):
        calls.append((name, num, seed, options))
        return np.full((num, 8, 8, 1), seed / 10.0, np.float32)

    fake = types.SimpleNamespace(BUILTIN_MODELS={"fake-digits": "a test model"}, sample_builtin=sample_builtin)
    import jaxdiff

    monkeypatch.setitem(sys.modules, "jaxdiff.builtin", fake)
    monkeypatch.setattr(jaxdiff, "builtin", fake, raising=False)
    out = tmp_path / "d.png"
    assert main(["sample", "--model", "fake-digits", "--num", "4", "--label", "3", "--steps", "5", "--seed", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert calls[-1] == ("fake-digits", 4, 2, {"steps": 5, "label": 3})
    assert read_settings(out)["label"] == 3
    assert main(["sample", "--from-png", str(out), "--out", str(tmp_path / "e.png"), "--no-progress"]) == 0
    assert calls[-1] == calls[0]


def test_default_model_is_the_builtin_digits_grid(tmp_path):
    """`jaxdiff sample` with no model writes the digits grid: one column per class, 4x zoom."""
    out = tmp_path / "digits.png"
    assert main(["sample", "--out", str(out), "--no-progress", "--num", "20", "--steps", "4"]) == 0
    settings = read_settings(out)
    assert settings["model"] == "digits" and settings["num"] == 20
    with Image.open(out) as im:
        assert im.size == (10 * 32 + 9 * 4, 2 * 32 + 4)
