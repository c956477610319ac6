"""The built-in digits models: shipped weights load by name, sampling works and gives the asked-for digits."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import builtin
from jaxdiff.convert import open_safetensors

ALL = [*builtin.BUILTIN_MODELS, *builtin.BUILTIN_CLASSIFIERS]
NUM = 20  # one batch shape for every digits test: one compilation


@pytest.fixture(scope="module")
def cfg_samples():
    """20 samples, labels 0..9 twice, classifier-free guidance 3, DPM-Solver++ 2M, 20 steps."""
    return builtin.sample_builtin("digits", num=NUM, guidance=3.0, seed=0)


@pytest.fixture(scope="module")
def judge():
    net = builtin.load_builtin("digits-eval")
    return jax.jit(lambda x: jnp.argmax(net(x), axis=-1))


@pytest.mark.parametrize("name", ALL)
def test_shipped_weights_load_by_name_and_are_small(name):
    path = builtin.ASSETS / name / "model.safetensors"
    assert path.stat().st_size < 4e6
    net = builtin.load_network(name)
    with open_safetensors(path) as tensors:
        n_file = sum(int(np.prod(s)) for s in tensors.shapes.values())
    n_model = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(net.state))
    assert n_file == n_model > 1e5
    assert builtin.builtin_config(name)["training"]["steps"] > 0


def test_exporter_is_the_inverse_of_the_loader():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
    from _common import export_tensors

    exported = export_tensors(builtin.load_network("digits").module())
    with open_safetensors(builtin.ASSETS / "digits" / "model.safetensors") as tensors:
        assert sorted(exported) == sorted(tensors)
        for k in ("conv_in.weight", "down_blocks.1.attentions.0.to_q.weight", "class_embedding.weight"):
            np.testing.assert_array_equal(exported[k], tensors[k])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="digits-ncsn") as e:
        builtin.load_builtin("mnist")
    assert "digits-eval" in str(e.value)
    with pytest.raises(ValueError, match="valid names: digits, digits-ncsn"):
        builtin.sample_builtin("digits-classifier")


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="label must be a digit"):
        builtin.sample_builtin("digits", num=2, label=12)
    with pytest.raises(ValueError, match="valid: karras"):
        builtin.sample_builtin("digits", num=2, schedule="cosine")
    with pytest.raises(ValueError, match="unconditional"):
        builtin.guided_denoiser("digits-ncsn", np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="unconditional"):
        builtin.sample_builtin("digits-ncsn", num=2, label=3)
    with pytest.raises(ValueError, match="steps must be"):
        builtin.make_sigmas("digits", "karras", 0)


def test_sample_shape_range_and_determinism(cfg_samples):
    assert cfg_samples.shape == (NUM, 8, 8, 1) and cfg_samples.dtype == np.float32
    assert cfg_samples.min() >= 0.0 and cfg_samples.max() <= 1.0
    assert cfg_samples.std() > 0.2  # digits, not a flat image: ink (1) on background (0)
    again = builtin.sample_builtin("digits", num=NUM, guidance=3.0, seed=0)
    np.testing.assert_array_equal(again, cfg_samples)
    other = builtin.sample_builtin("digits", num=NUM, guidance=3.0, seed=1)
    assert np.abs(other - cfg_samples).mean() > 0.05


def test_conditional_samples_are_their_labels(cfg_samples, judge):
    labels = np.arange(NUM) % 10
    predicted = np.asarray(judge(jnp.asarray(cfg_samples) * 2.0 - 1.0))
    assert np.mean(predicted == labels) >= 0.9, predicted
    sevens = builtin.sample_builtin("digits", num=NUM, label=7, guidance=3.0, seed=3)
    assert np.mean(np.asarray(judge(jnp.asarray(sevens) * 2.0 - 1.0)) == 7) >= 0.9


def test_evaluation_classifier_reads_held_out_digits(judge):
    pytest.importorskip("sklearn")
    from jaxdiff.train import load_digits_dataset

    _, held = load_digits_dataset()
    assert np.mean(np.asarray(judge(held["x"])) == held["label"]) >= 0.97


def test_noisy_classifier_reads_slightly_noisy_digits():
    pytest.importorskip("sklearn")
    from jaxdiff.train import load_digits_dataset

    _, held = load_digits_dataset()
    clf = builtin.load_builtin("digits-classifier")
    x = held["x"] + 0.2 * np.random.default_rng(0).standard_normal(held["x"].shape).astype(np.float32)
    acc = np.mean(np.argmax(np.asarray(clf(jnp.asarray(x), jnp.float32(0.2))), -1) == held["label"])
    assert acc >= 0.9


def test_ncsn_langevin_gives_digit_like_images(judge):
    x = builtin.sample_builtin("digits-ncsn", num=NUM, sampler="langevin", seed=0)
    assert x.shape == (NUM, 8, 8, 1) and 0.0 <= x.min() and x.max() <= 1.0
    # real digits are mostly background with some full ink: a bimodal histogram, unlike noise
    assert np.mean((x < 0.15) | (x > 0.85)) > 0.6
    assert len(set(np.asarray(judge(jnp.asarray(x) * 2 - 1)).tolist())) >= 4  # not one repeated digit


def test_image_grid_layout():
    images = np.zeros((12, 8, 8, 1), np.float32)
    images[5] = 1.0
    grid = builtin.image_grid(images, ncol=5, scale=2, pad=1)
    assert grid.shape == (3 * 17 + 1, 5 * 17 + 1) and grid.dtype == np.uint8
    assert (grid[1:17, 1:17] == 0).all() and (grid[18:34, 1:17] == 255).all() and grid[0, 0] == 128


@pytest.mark.parity
def test_shipped_unet_is_a_diffusers_checkpoint():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    cfg = builtin.builtin_config("digits")["network"]
    ref = diffusers.UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    ref.load_state_dict(load_file(str(builtin.ASSETS / "digits" / "model.safetensors")), strict=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    t, y = np.array([5.0, 400.0, 990.0], np.float32), np.array([1, 7, 10])
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), class_labels=torch.from_numpy(y))
    got = builtin.load_network("digits")(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    want = want.sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_ncsn_adapter_is_ncsnv2_with_log_sigma_time():
    scale, shift = builtin.ncsn_time_map(0.01, 10.0)
    assert scale * np.log(0.01) + shift == pytest.approx(0.0, abs=1e-9)
    assert scale * np.log(10.0) + shift == pytest.approx(999.0)
    seen = {}

    def net(x, t, cond):  # eps_hat = t / 1000 everywhere
        seen["t"] = t
        return jnp.ones_like(x) * (t / 1000.0)[:, None, None, None]

    den = builtin.ncsn_denoiser(jax.tree_util.Partial(net), {"sigma_min": 0.01, "sigma_max": 10.0})
    x, sigma = jnp.ones((2, 8, 8, 1)), jnp.array([0.1, 1.0])
    t = scale * np.log(np.array([0.1, 1.0])) + shift
    np.testing.assert_allclose(den(x, sigma)[:, 0, 0, 0],
                               1.0 - np.array([0.1, 1.0]) * t / 1000.0, rtol=1e-5)
    np.testing.assert_allclose(seen["t"], t, rtol=1e-5)


def test_builtin_recipe_takes_both_transform_levels_in_one_program():
    """A network transform (scaling the U-Net's epsilon) and a denoiser transform (a shift) run inside the
    compiled loop: neutral values give the plain samples, new values reuse the program and change them."""
    from jaxdiff import conditioning, guidance, sampling
    from jaxdiff._pytree import pytree_dataclass

    @pytree_dataclass
    class OutputScale:
        inner: object
        s: jax.Array

        def __call__(self, x, t, cond=None):
            return self.inner(x, t, cond) * self.s

    @pytree_dataclass
    class Shift:
        inner: object
        c: jax.Array

        def __call__(self, x, sigma, cond=None):
            return self.inner(x, sigma, cond) + self.c

    def run(s, c):
        return builtin.sample_builtin("digits", num=2, steps=4, guidance=2.0, mesh=None,
                                      network_transform=conditioning.Transform(OutputScale, {"s": jnp.float32(s)}),
                                      transform=guidance.Transform(Shift, {"c": jnp.float32(c)}))

    plain = builtin.sample_builtin("digits", num=2, steps=4, guidance=2.0, mesh=None)
    np.testing.assert_allclose(run(1.0, 0.0), plain, atol=1e-6)
    size = sampling.sample_jit._cache_size()
    a, b = run(0.8, 0.0), run(1.0, 0.05)
    assert sampling.sample_jit._cache_size() == size
    assert np.abs(a - plain).max() > 1e-3 and np.abs(b - plain).max() > 1e-3


def test_the_judge_retrains_from_its_example_script(tmp_path):
    """examples/digits retrains digits-eval (its own shifted cross-entropy through ClassifierObjective): three steps
    run, the loss of the fresh 10-class classifier is near ln 10, and the folder is written."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
    from _common import train_model

    record = train_model("digits-eval", steps=3, workdir=tmp_path / "work", out_dir=tmp_path, progress=False)
    assert abs(record["final_loss"] - np.log(10)) < 0.3
    assert (tmp_path / "digits-eval" / "model.safetensors").exists()
