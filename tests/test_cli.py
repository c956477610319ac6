"""The jaxdiff command line: built-in mixture, Stable Diffusion folders, PNG settings and --from-png, errors."""
from __future__ import annotations

import hashlib
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

    fake = types.SimpleNamespace(BUILTIN_MODELS={"fake-digits": "a test model"}, BUILTIN_IMAGE_TO_IMAGE={},
                                 sample_builtin=sample_builtin,
                                 SCHEDULE_NAMES=("karras",), builtin_config=lambda name: {"adapter": {"kind": "ve"}})
    import jaxdiff

    monkeypatch.setitem(sys.modules, "jaxdiff.builtin", fake)
    monkeypatch.setattr(jaxdiff, "builtin", fake, raising=False)
    out = tmp_path / "d.png"
    assert main(["sample", "--model", "fake-digits", "--num", "4", "--label", "3", "--steps", "5", "--seed", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert calls[-1] == ("fake-digits", 4, 2, {"steps": 5, "label": 3, "sampler": "dpmpp_2m", "schedule": "karras",
                                               "guidance": 3.0, "classifier_scale": 0.0})
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


def _png(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_png_records_absolute_inputs_and_reproduces_from_any_folder(sd_folder, tmp_path, monkeypatch, capsys):
    """Relative --init-image/--mask are stored absolute with their sha256; every default in effect is recorded;
    --from-png reproduces from another folder, never overwrites its source, and refuses a changed input."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _png(inputs / "init.png", 16, 0)
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    mask.save(inputs / "mask.png")
    monkeypatch.chdir(inputs)
    assert main(["sample", "--model", str(sd_folder), "--prompt", "a", "--init-image", "init.png", "--mask", "mask.png",
                 "--steps", "2", "--out", "run.png", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err  # PNDM folder: documented stand-in, no warning
    s = read_settings(inputs / "run.png")
    for key in ("init_image", "mask"):
        path = inputs / f"{key.split('_')[0]}.png"
        assert s[key] == str(path.resolve()) and s[f"{key}_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {k: s[k] for k in ("sampler", "schedule", "steps", "guidance", "rescale", "strength", "height", "width",
                              "dtype", "seed", "clip_skip")} == dict(
        sampler="dpmpp_2m", schedule="default", steps=2, guidance=7.5, rescale=0.0, strength=1.0, height=16, width=16,
        dtype="float32", seed=[0], clip_skip=0)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(inputs / "run.png", other / "samples.png")
    before = (other / "samples.png").read_bytes()
    monkeypatch.chdir(other)
    assert main(["sample", "--from-png", "samples.png", "--no-progress"]) == 0  # default --out is the source
    assert (other / "samples.png").read_bytes() == before
    np.testing.assert_array_equal(np.asarray(Image.open(other / "samples-repro.png")), np.asarray(Image.open(other / "samples.png")))
    capsys.readouterr()
    assert main(["sample", "--from-png", "samples.png", "--out", "./samples.png"]) == 2
    assert "would overwrite the --from-png file" in capsys.readouterr().err
    _png(inputs / "init.png", 16, 1)  # the init image changes
    assert main(["sample", "--from-png", "samples.png", "--out", "again.png"]) == 2
    assert "changed since the PNG was made" in capsys.readouterr().err and not (other / "again.png").exists()


def test_unknown_scheduler_warns_once_in_one_line(sd_folder, tmp_path, monkeypatch, capsys):
    from jaxdiff.pipelines import schedulers

    monkeypatch.setattr(schedulers, "_WARNED", set())
    folder = shutil.copytree(sd_folder, tmp_path / "kdpm2")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "_class_name": "KDPM2DiscreteScheduler"}))
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # Python's own, which pytest replaces
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    # height 15 fails after the plan (odd): the warning shows without sampling
    assert main(["sample", "--model", str(folder), "--prompt", "a", "--steps", "2", "--height", "15", "--width", "16",
                 "--out", str(tmp_path / "k.png"), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0] == ("warning: KDPM2DiscreteScheduler has no jaxdiff equivalent; sampling with dpmpp_2m instead "
                        "(choose one with sampler=... / --sampler)")
    assert len(lines) == 2 and lines[1].startswith("error: ")


def test_bad_sd_inputs_fail_in_one_line_before_writing(sd_folder, tmp_path, monkeypatch, capsys):
    """Each bad input: exit 2, one `error:` line naming the problem, and no file written."""
    monkeypatch.chdir(tmp_path)
    init, small_mask = _png(tmp_path / "init.png", 16, 0), _png(tmp_path / "small.png", 8, 0, "L")
    (tmp_path / "junk.png").write_text("not an image")
    (tmp_path / "outdir").mkdir()
    base = ["sample", "--model", str(sd_folder), "--prompt", "a", "--steps", "2", "--no-progress"]
    cases = {
        ("--init-image", str(init), "--mask", str(small_mask)): "--mask is 8x8 but the init image is 16x16",
        ("--init-image", "junk.png"): "--init-image junk.png is not an image file",
        ("--init-image", str(init), "--mask", "junk.png"): "--mask junk.png is not an image file",
        ("--guidance", "nan"): "--guidance must be a finite number, got nan",
        ("--rescale", "inf"): "--rescale must be a finite number",
        ("--seed", "-1"): "outside [0, 2^32)",
        ("--seed", str(2**32 - 1), "--batch", "2"): "outside [0, 2^32)",
        ("--out", "picture"): "must end in .png",
        ("--out", "picture.jpg"): "must end in .png",
        ("--out", "outdir"): "is a folder",
        ("--out", "outdir/"): "is a folder",
        ("--steps", "1001"): "use --steps 1000 or fewer",
        ("--label", "3"): "--label does not apply to the Stable Diffusion folder",
        ("--num", "2"): "--num does not apply to the Stable Diffusion folder",
        ("--classifier-scale", "1"): "--classifier-scale does not apply",
        ("--schedule", "vp_discrete"): "valid for it: default, karras, exponential, leading, trailing, linspace",
    }
    for extra, message in cases.items():
        assert main(base + list(extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, (extra, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["init.png", "junk.png", "outdir", "small.png"]


def test_float16_on_cpu_is_refused_clearly(sd_folder, capsys):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("float16 runs on accelerators")
    assert main(["sample", "--model", str(sd_folder), "--prompt", "a", "--dtype", "float16"]) == 2
    assert "--dtype float16 does not run on the CPU backend" in capsys.readouterr().err
