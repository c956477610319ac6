"""The CLI with built-in models and the mixture: recorded defaults, --classifier-scale, schedule names, help, bench."""
from __future__ import annotations

import argparse
import inspect
import json
import sys

import numpy as np
import pytest
from PIL import Image

from jaxdiff import cli
from jaxdiff.cli import main
from jaxdiff.images import read_settings

NO = "--no-progress"


def test_digits_png_records_the_defaults_in_effect_and_reproduces(tmp_path, monkeypatch):
    """Defaults as jaxdiff.builtin.sample_builtin defines them are written to the PNG; --from-png of the default
    output name writes a fresh file."""
    from jaxdiff import builtin

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--num", "10", NO]) == 0
    s = read_settings(tmp_path / "samples.png")
    api = inspect.signature(builtin.sample_builtin).parameters
    assert (s["model"], s["sampler"], s["guidance"], s["classifier_scale"], s["seed"], s["num"]) == (
        "digits", api["sampler"].default, api["guidance"].default, api["classifier_scale"].default, 0, 10)
    assert (s["schedule"], s["steps"], s["label"], s["height"], s["width"]) == ("karras", 20, None, 8, 8)
    before = (tmp_path / "samples.png").read_bytes()
    assert main(["sample", "--from-png", "samples.png", NO]) == 0
    assert (tmp_path / "samples.png").read_bytes() == before
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "samples-repro.png")),
                                  np.asarray(Image.open(tmp_path / "samples.png")))


def test_classifier_scale_reaches_classifier_guidance(tmp_path):
    """--classifier-scale samples as sample_builtin(classifier_scale=...) (digits-classifier guidance)."""
    from jaxdiff import builtin
    from jaxdiff.images import grid, to_uint8

    out = tmp_path / "cg.png"
    assert main(["sample", "--classifier-scale", "2", "--label", "3", "--num", "4", "--steps", "2", "--out", str(out),
                 NO]) == 0
    s = read_settings(out)
    assert s["classifier_scale"] == 2.0 and "guidance" not in s
    ref = builtin.sample_builtin("digits", num=4, label=3, steps=2, classifier_scale=2.0, seed=0)
    plain = builtin.sample_builtin("digits", num=4, label=3, steps=2, seed=0)
    picture = lambda x: to_uint8(grid(np.asarray(x).repeat(4, 1).repeat(4, 2), pad=4))[..., 0]  # noqa: E731
    np.testing.assert_array_equal(np.asarray(Image.open(out)), picture(ref))
    assert not np.array_equal(picture(ref), picture(plain))


def test_mixture_png_records_settings_and_reproduces(tmp_path):
    out, again = tmp_path / "mix.png", tmp_path / "again.png"
    assert main(["sample", "--model", "mixture2d", "--num", "64", "--steps", "3", "--label", "1", "--out", str(out),
                 NO]) == 0
    s = read_settings(out)
    assert {k: s[k] for k in ("model", "sampler", "schedule", "steps", "guidance", "label", "num", "seed")} == dict(
        model="mixture2d", sampler="euler", schedule="karras", steps=3, guidance=1.0, label=1, num=64, seed=0)
    assert main(["sample", "--from-png", str(out), "--out", str(again), NO]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


def test_info_lists_the_schedules_each_model_accepts(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = info["schedules"]
    assert set(names) == {"stable_diffusion_folder", *info["models"]}
    assert info["models"] == ["mixture2d", "digits", "digits-ncsn", "digits-sd", "digits-palette", "digits-dit",
                              "digits-video", "digits-cascade", "digits-unclip"]
    assert names["digits-cascade"] == names["digits-unclip"] == []  # their own schedulers' steps
    assert info["encoders"] == ["digits-clip"] and names["digits-dit"] == names["stable_diffusion_folder"]
    assert "vp_discrete" in names["digits"] and "vp_discrete" not in names["digits-ncsn"]
    assert "default" in names["stable_diffusion_folder"] and "vp_discrete" not in names["mixture2d"]
    assert names["digits-sd"] == names["stable_diffusion_folder"]
    for model, other in (("mixture2d", "leading"), ("digits", "leading"), ("digits-ncsn", "leading"),
                         ("digits-sd", "ncsn_geometric")):  # a name that does not apply lists the ones that do
        assert other not in names[model]
        assert main(["sample", "--model", model, "--schedule", other, NO]) == 2
        assert capsys.readouterr().err.strip().endswith("valid for it: " + ", ".join(names[model]))


@pytest.mark.parametrize("argv, message", [
    (["--num", "0"], "--num must be at least 1, got 0"),
    (["--seed", str(2**32)], "outside [0, 2^32)"),
    (["--seed", "-3"], "outside [0, 2^32)"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--classifier-scale", "-1"], "--classifier-scale must be >= 0"),
    (["--classifier-scale", "1", "--guidance", "2"], "are alternatives"),
    (["--steps", "1001"], "use --steps 1000 or fewer"),
    (["--prompt", "a cat"], "--prompt does not apply to the built-in model digits"),
    (["--dtype", "bfloat16"], "--dtype does not apply"),
    (["--height", "16"], "--height does not apply"),
    (["--model", "digits-ncsn", "--guidance", "2"], "--guidance does not apply to the built-in model digits-ncsn"),
    (["--model", "digits-ncsn", "--label", "2"], "--label does not apply"),
    (["--model", "mixture2d", "--guidance", "2"], "only with --label"),
    (["--model", "mixture2d", "--classifier-scale", "2"], "--classifier-scale does not apply"),
    (["--out", "grid"], "must end in .png"),
])
def test_bad_builtin_input_is_one_line_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--steps", "2", *argv, NO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_from_png_that_is_not_an_image(tmp_path, capsys):
    (tmp_path / "x.png").write_text("text")
    assert main(["sample", "--from-png", str(tmp_path / "x.png")]) == 2
    assert "is not an image file" in capsys.readouterr().err


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings:
            yield parser.prog, action


def test_every_option_has_help():
    missing = [(prog, a.option_strings[0]) for prog, a in _options(cli.build_parser()) if not (a.help or "").strip()]
    assert missing == []


def test_help_defaults_match_what_runs():
    """The defaults --help states are the ones the CLI fills in (and records)."""
    from jaxdiff import builtin, schedules

    helps = {a.option_strings[0]: a.help for prog, a in _options(cli.build_parser()) if prog.endswith("sample")}
    assert f"SD {cli.SD_DEFAULTS['steps']}" in helps["--steps"] and f"built-in {cli.BUILTIN_DEFAULTS['steps']}" in helps["--steps"]
    assert f"SD {cli.SD_DEFAULTS['guidance']}" in helps["--guidance"]
    assert cli.MAX_STEPS == schedules.DEFAULT_CAPACITY
    api = inspect.signature(builtin.sample_builtin).parameters
    assert cli.BUILTIN_DEFAULTS["guidance"] == api["guidance"].default
    assert cli.BUILTIN_DEFAULTS["sampler"] == api["sampler"].default


def test_bench_without_a_source_checkout_is_one_clear_line(monkeypatch, tmp_path, capsys):
    """An installed jaxdiff without benchmarks/ : `jaxdiff bench` names what is missing; other commands still parse."""
    monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "benchmarks" / "throughput.py")
    monkeypatch.delitem(sys.modules, cli._BENCH_MODULE, raising=False)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0] and "throughput.py" in err[0]
    assert cli.build_parser().parse_args(["info"]).command == "info"


def test_bench_prints_resolution_dtype_and_device(monkeypatch, capsys):
    throughput = cli.bench_module()  # benchmarks/throughput.py, as `jaxdiff bench` loads it

    seen = {}

    def measure(sd, **kw):  # the real pipeline, without the timed sampling
        seen["static"] = sd.request(["a"], steps=1)[2]
        return {"images_per_s": 1.0}

    monkeypatch.setattr(throughput, "measure", measure)
    assert main(["bench", "--size", "tiny"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    side = seen["static"]["height"]
    assert result["resolution"] == f"{side}x{side}" and result["dtype"] == "float32" and result["device"]
    assert f"{side}x{side} float32 on {result['device']}" in out.err
    assert f"tiny ({side}x{side} images)" in next(a.help for _, a in _options(cli.build_parser()) if "--size" in
                                                 a.option_strings)
