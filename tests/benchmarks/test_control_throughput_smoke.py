"""benchmarks/control_throughput.py end to end on the tiny size: the promised keys, and jaxdiff's ControlNet
images equal diffusers' on the same folders and latents (the benchmark's own exactness check)."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from benchmarks.control_throughput import TOLERANCE, main  # noqa: E402

KEYS = ("controlnet_throughput_ratio", "jaxdiff_images_per_s", "diffusers_images_per_s", "jaxdiff_compile_s",
        "jaxdiff_first_call_s", "diffusers_first_call_s", "max_abs_diff", "images_agree", "torch_threads", "machine",
        "load", "jaxdiff_seconds_per_batch", "diffusers_seconds_per_batch")


def test_tiny_run_writes_the_keys_and_the_frameworks_agree(tmp_path):
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    # one torch thread: PyTorch's pool collapses when the test machine's cores are busy (seconds per call)
    res = main(["--size", "tiny", "--steps", "2", "--batch", "1", "--rounds", "1", "--torch-threads", "1",
                "--json", str(out), "--md", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for key in KEYS:
        assert key in res, key
    assert res["torch_threads"] == 1 and res["batch"] == 1 and res["steps"] == 2
    assert res["jaxdiff_images_per_s"] > 0 and res["diffusers_images_per_s"] > 0
    ratio = res["controlnet_throughput_ratio"]
    assert (ratio is None) == (not res["load"]["quiet"])
    if ratio is not None:
        assert ratio == pytest.approx(res["jaxdiff_images_per_s"] / res["diffusers_images_per_s"])
    # the images agree, are not flat, and the control moves them far beyond the tolerance
    assert res["images_agree"] and res["max_abs_diff"] <= TOLERANCE
    assert res["image_std"] > 0.02
    assert res["control_effect_max_abs"] > 20 * TOLERANCE
    assert np.isfinite(res["jaxdiff_compile_s"]) and res["jaxdiff_compile_s"] >= 0
    # the scale-0 call reused the compiled program (a recompile costs about the first call)
    assert res["jaxdiff_scale0_call_s"] < 0.5 * res["jaxdiff_first_call_s"]
    assert "controlnet_throughput_ratio" in md.read_text()
