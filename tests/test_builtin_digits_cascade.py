"""digits-cascade: the shipped IF-style folders load and sample in one program; IF's conditioning conventions hold;
the example's training step is deterministic."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import builtin
from jaxdiff.pipelines import cascade as C
from jaxdiff.pipelines import pixel_cascade as P
from tests._examples import load_script


def _example():
    return load_script("examples/cascade/train.py", "cascade_train")


def test_resize_align_corners_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 3)).astype(np.float32)
    for size in ((32, 17), (8, 1), (3, 5)):
        ref = torch.nn.functional.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size, mode="bilinear",
                                              align_corners=True).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(C.resize_align_corners(jnp.asarray(x), size)), ref, atol=1e-5)
    with pytest.raises(ValueError, match="one length per spatial axis"):
        C.resize_align_corners(jnp.asarray(x), (32,))


def test_super_resolution_net_feeds_if_noised_image_and_level():
    """The cascade's ``up + sigma_t n`` reaches the U-Net as diffusers' ``add_noise(up, n, t)`` with class label t."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ac = jnp.asarray(sched.alphas_cumprod.numpy(), jnp.float32)
    seen = {}

    def unet(x, t, context, class_labels=None):
        seen.update(x=x, labels=class_labels)
        return jnp.concatenate([x[..., :3] * 0, x[..., :3] * 0 + 7.0], -1)

    rng = np.random.default_rng(1)
    up, noise = rng.standard_normal((3, 4, 4, 3)).astype(np.float32), rng.standard_normal((3, 4, 4, 3)).astype(np.float32)
    steps = np.array([0, 100, 731])
    sigma = P.level_sigma(steps, ac)
    x = jnp.concatenate([jnp.zeros_like(up), up + np.asarray(sigma)[:, None, None, None] * noise], -1)
    out = P.SuperResolutionNet(unet, ac)(x, jnp.zeros(3), {"context": None, "noise_level": sigma})
    ref = sched.add_noise(torch.tensor(up), torch.tensor(noise), torch.tensor(steps)).numpy()
    np.testing.assert_allclose(np.asarray(seen["x"][..., 3:]), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(seen["labels"]), steps, atol=1e-3)
    assert out.shape == (3, 4, 4, 3) and float(jnp.abs(out).max()) == 0.0  # the variance half is dropped
    with pytest.raises(ValueError, match="low-resolution channels"):
        P.SuperResolutionNet(unet, ac)(x[..., :4], jnp.zeros(3), {"context": None, "noise_level": sigma})


def test_downsample_is_the_block_mean():
    T = _example()
    x = np.random.default_rng(2).random((2, 8, 12, 3)).astype(np.float32)
    low = T.downsample(x)
    assert low.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(low[1, 1, 2], x[1, 4:8, 8:12].mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(T.downsample(np.repeat(np.repeat(low, 4, 1), 4, 2)), low, rtol=1e-6)


@pytest.fixture(scope="module")
def cascade():
    return builtin.load_cascade("digits-cascade")


def test_builtin_is_if_folders_within_budget():
    folder = builtin.cascade_folder("digits-cascade")
    assert json.loads((folder / "stage_1" / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    s2 = json.loads((folder / "stage_2" / "model_index.json").read_text())
    assert s2["_class_name"] == "IFSuperResolutionPipeline" and s2["image_noising_scheduler"][1] == "DDPMScheduler"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 3 * 2**20
    with pytest.raises(ValueError, match="unknown built-in"):
        builtin.cascade_folder("digits-sd")


def test_builtin_cascade_samples_in_one_program(cascade):
    m = cascade
    assert m.base_shape == (8, 8, 3) and m.sr_shape == (32, 32, 3)
    assert m.predictions == ("epsilon", "v_prediction")  # read from each stage's scheduler
    ctx = m.encode(["a red seven on a white background"])
    uncond = m.encode([""])[0]
    C.cascade_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = C.cascade_jit._cache_size()
    outs = [C.cascade_jit(P.cascade_stages(m, ctx, uncond, steps=s, guidance_scales=g, noise_level=n, capacity=4),
                          jax.random.key(0), 1) for s, g, n in (((2, 2), (4.0, 1.0), 100), ((1, 3), (2.0, 3.0), 250))]
    assert C.cascade_jit._cache_size() - before == 1  # steps, guidance and augmentation level are runtime values
    for low, high in outs:
        assert low.shape == (1, 8, 8, 3) and high.shape == (1, 32, 32, 3)
        assert np.isfinite(np.asarray(high)).all() and float(jnp.abs(high).max()) <= 1.0 + 1e-5  # dynamic threshold
    assert float(jnp.abs(outs[0][1] - outs[1][1]).max()) > 1e-3


def _tiny(T, monkeypatch):
    monkeypatch.setattr(T, "SR_UNET", {**T.SR_UNET, "block_out_channels": [8], "norm_num_groups": 4,
                                       "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
                                       "sample_size": 8})
    rng = np.random.default_rng(3)
    high = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    data = {"high": high, "low": T.downsample(high, 2), "context": rng.standard_normal((4, 5, 16)).astype(np.float32)}
    return data, np.zeros((5, 16), np.float32)


def test_training_step_is_deterministic_and_augmentation_levels(monkeypatch):
    T = _example()
    data, null = _tiny(T, monkeypatch)
    trainer, start, dataset = T.setup("sr", data, null, 2, batch_size=4)

    def params():
        state = start
        for _ in range(2):
            state, _ = trainer.step_fn(state, dataset.batch(int(state.step)), trainer.objective)
        return jax.tree.leaves(state.params)

    a, b = params(), params()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, jax.tree.leaves(start.params))) > 0
    obj = T.objective("sr", null)
    levels = np.asarray(obj.levels(jax.random.key(0), 256))
    sig = np.asarray(P.level_sigma(np.arange(T.AUG_MAX), obj.aug_alphas_cumprod))
    assert np.isin(levels, sig).all() and np.unique(levels).size > 100  # IF's integer steps, spread over [0, AUG_MAX)
    assert not np.asarray(T.objective("sr-noaug", null).levels(jax.random.key(0), 8)).any()


def test_cli_samples_digits_cascade_by_name_with_its_measured_defaults(tmp_path, capsys):
    """``jaxdiff sample --model digits-cascade``: the name finds the shipped folder, unset options take the settings
    its ``cascade.json`` was measured with, and the PNG is the IF cascade's image for those settings."""
    from PIL import Image

    from jaxdiff import cli
    from jaxdiff.images import read_settings
    from jaxdiff.pipelines import deepfloyd_if as IF

    folder = builtin.cascade_folder("digits-cascade")
    spec = json.loads((folder / "cascade.json").read_text())["sampling"]
    prompt = "a red seven on a white background"
    out = tmp_path / "c.png"
    assert cli.main(["sample", "--model", "digits-cascade", "--prompt", prompt, "--stage-steps", "3,2", "--seed", "4",
                     "--out", str(out)]) == 0
    settings = read_settings(out)
    assert settings["stage_guidance"] == spec["guidance"] and settings["noise_level"] == [spec["noise_level"]]
    _, high = IF.IFCascade.from_pretrained(folder)([prompt], steps=(3, 2), guidance=tuple(spec["guidance"]),
                                                   noise_level=(0, spec["noise_level"]), seed=4)
    png = np.asarray(Image.open(out), np.float32) / 255.0
    np.testing.assert_allclose(png, np.asarray(high[0]), atol=0.5 / 255 + 1e-4)
    assert Image.open(tmp_path / "c-stage1.png").size == (8, 8)
    capsys.readouterr()
    assert cli.main(["info", "--model", "digits-cascade"]) == 0
    assert '"IFSuperResolutionPipeline"' in capsys.readouterr().out
    assert "digits-cascade" in cli.sampleable_models() and "digits-unclip" in cli.sampleable_models()
