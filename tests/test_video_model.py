"""Class-conditional video diffusion (Ho et al. 2022): the joint image-video objective, the frame judge, GIFs, and
the built-in digits-video (loads, samples the asked digit, CLI)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff import builtin
from jaxdiff.data.moving_digits import load_moving_digits, sprite_crops
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import ddpm_loss
from jaxdiff.models._pure import PureModel
from jaxdiff.models.video_unet import ClassVideoUNet, ClassVideoUNetConfig
from jaxdiff.pipelines import video as V
from jaxdiff.train.video import Framewise, JointVideoObjective

TINY = {"num_classes": 10, "unet": dict(
    in_channels=1, out_channels=1, block_out_channels=[8], layers_per_block=1, norm_num_groups=4,
    cross_attention_dim=8, attention_head_dim=4, down_block_types=["DownBlock3D"], up_block_types=["UpBlock3D"],
    temporal_relative_positions=2)}
TEMPORAL = ("temp_convs", "temp_attentions", "transformer_in")


@pytest.fixture(scope="module")
def tiny():
    return PureModel.of(ClassVideoUNet(ClassVideoUNetConfig.from_dict(TINY), rngs=nnx.Rngs(0)))


def _perturb_temporal(net: PureModel) -> PureModel:
    """The zero-initialised last temporal convs made nonzero, so the temporal layers really mix frames."""
    state = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 if any(t in jax.tree_util.keystr(p) for t in TEMPORAL) else a, net.state)
    return PureModel(state=state, graphdef=net.graphdef)


def test_framewise_frames_are_independent(tiny):
    """Joint training's masking: with the temporal layers off, changing frame 0 changes frame 0's output and leaves
    every other frame's exactly unchanged; with them on, it changes the other frames."""
    net = _perturb_temporal(tiny)
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8, 1)).astype(np.float32)
    y = x.copy()
    y[:, 0] += 1.0
    labels = jnp.array([3])
    run = jax.jit(lambda n, v: jnp.stack([n(v, 50.0, labels), Framewise(n)(v, 50.0, labels)]))
    (on_x, off_x), (on_y, off_y) = run(net, x), run(net, y)
    assert np.abs(np.asarray(on_x - on_y)[:, 1:]).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(off_x)[:, 1:], np.asarray(off_y)[:, 1:])
    assert np.abs(np.asarray(off_x - off_y)[:, 0]).max() > 1e-4


def test_joint_objective(tiny):
    """The video part of the joint loss is the video-only loss (same key); the image part is the mean of per-image
    1-frame losses; its gradient never reaches a temporal parameter (masked), the video loss's does."""
    ac = jnp.asarray(builtin.vp_alphas_cumprod({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}))
    den = DiscreteVPDenoiser(None, ac)
    rng = np.random.default_rng(1)
    batch = {"x": rng.uniform(-1, 1, (2, 4, 8, 8, 1)).astype(np.float32), "label": np.array([1, 2], np.int32),
             "images": rng.uniform(-1, 1, (2, 3, 8, 8, 1)).astype(np.float32),
             "image_label": np.array([[0, 4, 5], [6, 7, 8]], np.int32)}
    key = jax.random.key(0)
    video_only = JointVideoObjective(ddpm_loss(ac), den, label_dropout=0.0)
    assert video_only.batch_keys == ("x", "label")
    joint = [JointVideoObjective(ddpm_loss(ac), den, label_dropout=0.0, image_weight=w, images_per_video=3)
             for w in (0.0, 1.0, 2.0)]  # image_weight is a traced leaf: one program for the three
    assert joint[1].batch_keys == ("x", "label", "images", "image_label")
    net = _perturb_temporal(tiny)
    run = jax.jit(lambda objective, n: objective(n, batch, key))
    (v, _), (j, aux), (j2, _) = (run(o, net) for o in joint)
    v, j, j2 = np.asarray(v), np.asarray(j), np.asarray(j2)
    assert v.shape == j.shape == (2,)
    np.testing.assert_allclose(float(aux["video_loss"]), float(np.mean(v)), rtol=1e-6)  # weight 0: the video loss
    assert np.all(j > v)  # the image losses are positive
    np.testing.assert_allclose(j2 - v, 2 * (j - v), rtol=1e-5)  # linear in image_weight
    np.testing.assert_allclose(float(aux["image_loss"]), float(np.mean(j - v)), rtol=1e-5)

    # the image frames' loss runs through Framewise: its gradient never reaches a temporal parameter
    grads = jax.jit(jax.grad(lambda st: jnp.sum(Framewise(PureModel(state=st, graphdef=net.graphdef))(
        jnp.asarray(batch["images"][:, :1]), 30.0, jnp.asarray(batch["label"])) ** 2)))(net.state)
    flat = [(jax.tree_util.keystr(p), np.abs(np.asarray(g)).max())
            for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
    temporal = [m for p, m in flat if any(t in p for t in TEMPORAL)]
    spatial = [m for p, m in flat if not any(t in p for t in TEMPORAL)]
    assert len(temporal) > 10 and max(temporal) == 0.0
    assert max(spatial) > 0.0
    with pytest.raises(ValueError, match="images_per_video"):
        JointVideoObjective(ddpm_loss(ac), den, images_per_video=-1)


def test_sprite_crops_find_the_digit():
    """On real clips (8x8 sprites) the most-ink window is within a pixel of the true sprite corner."""
    d = load_moving_digits("held_out", 20, frames=4, size=16, sprite=8, speed=(0.5, 1.5))
    crops, corner = sprite_crops(d["video"])
    assert crops.shape == (20, 4, 8, 8)
    assert np.abs(corner - d["position"]).max() <= 1.25
    r, c = corner[3, 2]
    np.testing.assert_array_equal(crops[3, 2], d["video"][3, 2, r:r + 8, c:c + 8, 0])


def test_gif_round_trip(tmp_path):
    """write_gif then read_gif gives the frames back (8-bit grey, each pixel scale x scale)."""
    v = np.random.default_rng(0).uniform(size=(5, 6, 7, 1)).astype(np.float32)
    path = V.write_gif(v, tmp_path / "a.gif", scale=2)
    back = read = V.read_gif(path)
    assert read.shape == (5, 12, 14)
    np.testing.assert_allclose(back[:, ::2, ::2], np.round(v[..., 0] * 255) / 255, atol=1e-6)
    with pytest.raises(ValueError, match="one clip"):
        V.write_gif(np.zeros((2, 3, 4, 4, 1)), tmp_path / "b.gif")


@pytest.fixture(scope="module")
def digits_video():
    return V.load_video_model(builtin.builtin_folder("digits-video"))


def test_builtin_digits_video_samples_the_asked_digit(digits_video):
    """The shipped model loads; 8 steps of DPM-Solver++ give (2, 8, 16, 16, 1) clips in [0, 1] whose frames the
    judge reads as the asked digits (chance 0.1; the model's frame accuracy is 0.998 at 20 steps in
    benchmarks/results/video_quality.md; at 8 steps these two clips read 15 of 16 frames right)."""
    clips = V.sample_videos(digits_video, np.array([3, 7]), steps=8, seed=0)
    assert clips.shape == (2, 8, 16, 16, 1) and clips.min() >= 0 and clips.max() <= 1
    judged = V.judge_videos(clips)
    assert np.mean(judged == np.array([3, 7])[:, None]) >= 0.8


def test_cli_digits_video_gif(tmp_path, capsys, digits_video):
    """``jaxdiff sample --model digits-video --label 3 --frames 6 --num 2 --out clip.gif`` writes a 6-frame GIF of two
    clips side by side (the sampling program of the test above: no new compile; longer clips go through
    ``extend_videos``, which benchmarks/video_quality.py runs); a .png --out is refused."""
    from jaxdiff import cli

    out = tmp_path / "clip.gif"
    assert cli.main(["sample", "--model", "digits-video", "--label", "3", "--frames", "6", "--steps", "4",
                     "--num", "2", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["shape"] == [2, 6, 16, 16, 1] and record["label"] == 3 and record["guidance"] == 4.0
    frames = V.read_gif(out)
    assert frames.shape == (6, 4 * (17 + 1), 4 * (2 * 17 + 1))
    assert cli.main(["sample", "--model", "digits-video", "--out", str(tmp_path / "x.png")]) == 2
