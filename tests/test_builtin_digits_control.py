"""The shipped digits-controlnet and digits-adapter: diffusers folders that diffusers loads unchanged and runs the
same, and a CLI run by name that draws along the control edges (the full measure: benchmarks/control_quality.py)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff import builtin  # noqa: E402
from jaxdiff.control_images import control_image, digit_edges  # noqa: E402
from jaxdiff.convert.folders import load_model_folder  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def controls():
    held = dt.load_digits_text(augment=1)["held_out"]
    return np.asarray(control_image(digit_edges(held["image"][:2])), np.float32)


def test_digits_controlnet_equals_diffusers_on_its_own_folder(controls):
    folder = builtin.builtin_folder("digits-controlnet")
    ours = load_model_folder(folder)
    ref = diffusers.ControlNetModel.from_pretrained(str(folder)).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ctx = rng.standard_normal((2, 24, 64)).astype(np.float32)
    res = ours(x, t, ctx, controls)
    with torch.no_grad():
        down, mid = ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), _nchw(controls), return_dict=False)
    assert len(down) == len(res.down) and float(np.abs(np.asarray(res.mid)).max()) > 1e-2  # trained, not zero
    for a, b in zip(res.down, down):
        np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(res.mid), mid.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_digits_adapter_equals_diffusers_on_its_own_folder(controls):
    folder = builtin.builtin_folder("digits-adapter")
    ours = load_model_folder(folder)(controls)
    with torch.no_grad():
        ref = diffusers.T2IAdapter.from_pretrained(str(folder)).eval()(_nchw(controls))
    assert [tuple(f.shape) for f in ours] == [(2, 8, 8, 32), (2, 4, 4, 64)]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_cli_draws_along_the_control_edges_by_name(tmp_path, controls):
    """``jaxdiff sample --model digits-sd --controlnet digits-controlnet --control edges.png``: four seeds all follow
    the edges (F1 within a pixel well above the ~0.66 of uncontrolled digits of the same class)."""
    from PIL import Image

    from jaxdiff.cli import main
    from jaxdiff.control_images import edge_agreement
    from jaxdiff.images import read_settings

    edges = tmp_path / "edges.png"
    Image.fromarray((controls[0] * 255).astype(np.uint8)).save(edges)
    held = dt.load_digits_text(augment=1)["held_out"]
    prompt = dt.caption(int(held["label"][0]), "blue", "yellow", "regular", "upright", np.random.default_rng(0))
    out = tmp_path / "out.png"
    assert main(["sample", "--model", "digits-sd", "--prompt", prompt, "--batch", "4", "--controlnet",
                 "digits-controlnet", "--control", str(edges), "--out", str(out), "--no-progress"]) == 0
    images = np.stack([np.asarray(Image.open(tmp_path / f"out-{i:03d}.png").convert("RGB"), np.float32) / 255
                       for i in range(4)])
    f1 = np.asarray(edge_agreement(np.asarray(digit_edges(images)), np.repeat(controls[:1, ..., 0] > 0.5, 4, 0))["f1"])
    assert f1.min() > 0.75, f1
    assert read_settings(out)["controlnet"] == ["digits-controlnet"]
