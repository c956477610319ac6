"""The built-in `digits-dit`: a small DiT pipeline folder that loads by name, draws the asked digit (judged), runs
from the CLI, and whose transformer diffusers loads to the same outputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff import builtin
from jaxdiff.cli import main
from jaxdiff.images import read_settings

NUM, STEPS = 10, 8  # one batch shape for the module and the CLI: one compilation


@pytest.fixture(scope="module")
def judge():
    net = builtin.load_builtin("digits-eval")
    return jax.jit(lambda x: jnp.argmax(net(x), axis=-1))


def test_shipped_folder_is_small_and_records_its_training():
    folder = builtin.builtin_folder("digits-dit")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 5e6
    record = json.loads((folder / "training.json").read_text())
    assert record["steps"] > 0 and record["run"].startswith("dit-") and "examples/dit/train.py" in record["script"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["vae"] == [None, None]  # pixel space


def test_builtin_dit_draws_the_asked_digit(judge):
    images = builtin.sample_dit("digits-dit", num=NUM, label=7, steps=STEPS, seed=1)
    assert images.shape == (NUM, 8, 8, 1) and 0.0 <= images.min() and images.max() <= 1.0
    assert float(np.mean(np.asarray(judge(images * 2.0 - 1.0)) == 7)) >= 0.9
    with pytest.raises(ValueError, match="label must be a digit"):
        builtin.sample_dit("digits-dit", num=2, label=12)


def test_cli_samples_digits_dit_and_reproduces_from_the_png(tmp_path, capsys, judge):
    out = tmp_path / "seven.png"
    args = ["sample", "--model", "digits-dit", "--label", "7", "--num", str(NUM), "--steps", str(STEPS),
            "--seed", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["label"] == 7 and printed["guidance"] == builtin.DIT_DEFAULTS["guidance"]
    assert read_settings(out)["model"] == "digits-dit"
    grid = np.asarray(Image.open(out)).astype(np.float32) / 255.0
    grid = grid if grid.ndim == 2 else grid[..., 0]
    cells = np.stack([grid[r * 36: r * 36 + 32: 4, k * 36: k * 36 + 32: 4] for r, k in map(lambda i: divmod(i, 4),
                                                                                          range(NUM))])[..., None]
    api = builtin.sample_dit("digits-dit", num=NUM, label=7, steps=STEPS, seed=1)  # compiled above: the same program
    np.testing.assert_allclose(cells, api, atol=0.6 / 255)  # the grid holds the API's samples (4x cells of 8x8)
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert main(["sample", "--model", "digits-dit", "--classifier-scale", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "--classifier-scale does not apply" in capsys.readouterr().err


@pytest.mark.parity
def test_diffusers_loads_the_shipped_transformer_to_the_same_outputs():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    folder = builtin.builtin_folder("digits-dit")
    ref = diffusers.DiTTransformer2DModel.from_pretrained(str(folder / "transformer")).eval()
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 1)).astype(np.float32)
    t, y = np.array([999, 500, 3]), np.array([7, 10, 0])
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
                   class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    net = builtin.load_dit("digits-dit").models.transformer
    np.testing.assert_allclose(np.asarray(jax.jit(lambda n, *a: n(*a))(net, x, t, y)), want, atol=1e-4)
