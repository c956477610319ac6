"""Moving digits: determinism, bounds, the bounce law, the judge's split, and the centre-of-mass measure."""
from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.data import moving_digits as M
from jaxdiff.train.data import load_digits_dataset


@pytest.fixture(scope="module")
def train():
    return M.load_moving_digits("train", 120, frames=12, seed=3)


def test_deterministic_in_seed_and_index(train):
    again = M.load_moving_digits("train", 120, frames=12, seed=3)
    for k in train:
        np.testing.assert_array_equal(train[k], again[k], err_msg=k)
    prefix = M.load_moving_digits("train", 30, frames=12, seed=3)  # clip i does not depend on how many are drawn
    np.testing.assert_array_equal(prefix["video"], train["video"][:30])
    other = M.load_moving_digits("train", 30, frames=12, seed=4)
    assert not np.array_equal(other["start"], prefix["start"])


def test_shapes_dtypes_and_bounds(train):
    v = train["video"]
    assert v.shape == (120, 12, 32, 32, 1) and v.dtype == np.float32
    assert v.min() >= 0.0 and v.max() <= 1.0 and v.max() > 0.99
    assert train["label"].dtype == np.int32 and set(np.unique(train["label"])) <= set(range(10))
    assert len(np.unique(train["label"])) == 10
    assert np.all(train["position"] >= 0) and np.all(train["position"] <= 32 - 12)
    speed = np.linalg.norm(train["velocity"], axis=1)
    assert np.all((speed >= M.SPEED[0]) & (speed <= M.SPEED[1]))
    # every frame holds the whole sprite: the ink mass is constant over time
    mass = v.sum((2, 3, 4))
    np.testing.assert_allclose(mass, np.broadcast_to(mass[:, :1], mass.shape), rtol=1e-4)
    # the smaller layout of the issue: 24x24 frames, 10x10 sprites
    small = M.load_moving_digits("held_out", 10, frames=8, size=24, sprite=10)
    assert small["video"].shape == (10, 8, 24, 24, 1)


def _step_by_step(p0: np.ndarray, v0: np.ndarray, frames: int, limit: float) -> np.ndarray:
    """Independent simulation: move, and where a wall is crossed mirror the overshoot and flip that velocity."""
    p, v, out = p0.astype(np.float64).copy(), v0.astype(np.float64).copy(), []
    for _ in range(frames):
        out.append(p.copy())
        p = p + v
        low, high = p < 0, p > limit
        p = np.where(low, -p, np.where(high, 2 * limit - p, p))
        v = np.where(low | high, -v, v)
    return np.stack(out, axis=-2)


def test_bounce_law_reflects_at_walls_and_preserves_speed(train):
    expected = np.stack([_step_by_step(s, v, 12, 20.0) for s, v in zip(train["start"], train["velocity"])])
    np.testing.assert_allclose(train["position"], expected, atol=1e-9)
    steps = np.abs(np.diff(train["position"], axis=1))  # per axis
    speed = np.abs(train["velocity"])[:, None, :]
    free = steps > speed - 1e-9  # no wall touched during this step: |dp| = |v| exactly
    assert np.all(steps <= speed + 1e-9)
    assert 0.5 < free.mean() < 1.0  # most steps are free, and some clips do bounce
    # a long clip at speed 3 bounces many times and never leaves the box
    long = M.bounce(np.array([0.5, 19.0]), np.array([3.0, -2.5]), 64, 20.0)
    assert long.min() >= 0 and long.max() <= 20
    np.testing.assert_allclose(long, _step_by_step(np.array([0.5, 19.0]), np.array([3.0, -2.5]), 64, 20.0), atol=1e-9)


def test_held_out_digits_never_in_train():
    """The judge's held-out digits (load_digits_dataset, seed 0) appear in no training clip, and only they
    appear in held-out clips; checked on the 8x8 source images themselves."""
    from sklearn.datasets import load_digits

    _, held = load_digits_dataset()
    held_rows = {np.round((h[..., 0] + 1) * 8).astype(np.int8).tobytes() for h in held["x"]}
    images = np.round(load_digits().images).astype(np.int8)
    train = M.load_moving_digits("train", 3000, frames=2)
    assert len(np.unique(train["source"])) > 1000  # the check covers most of the training digits
    assert not any(images[i].tobytes() in held_rows for i in np.unique(train["source"]))
    test = M.load_moving_digits("held_out", 300, frames=2)
    assert all(images[i].tobytes() in held_rows for i in test["source"])
    np.testing.assert_array_equal(test["label"], load_digits().target[test["source"]])


def test_centre_of_mass_equals_the_analytic_position(train):
    com = M.centre_of_mass(train["video"])
    assert np.abs(com - train["centre"]).max() < 1.0
    # independently: a lone pixel sprite at sub-pixel offsets has its mass at the offset itself
    sprite = np.zeros((1, 8, 8))
    sprite[0, 2, 5] = 1.0
    pos = np.array([[[0.0, 0.0], [3.25, 7.5], [12.9, 0.1]]])
    got = M.centre_of_mass(M.render(sprite, pos, 24))
    np.testing.assert_allclose(got[0], pos[0] + [2.0, 5.0], atol=1e-5)


def test_motion_step_matches_the_velocity(train):
    """Without a bounce, the per-frame displacement is the speed; bounces only shorten steps."""
    step = M.motion_step(train["video"])
    speed = np.linalg.norm(train["velocity"], axis=1)
    assert np.all(step <= speed + 1e-3)
    steps = np.abs(np.diff(train["position"], axis=1))
    no_bounce = np.all(steps > np.abs(train["velocity"])[:, None] - 1e-9, axis=(1, 2))
    assert no_bounce.sum() > 5
    np.testing.assert_allclose(step[no_bounce], speed[no_bounce], atol=1e-3)
    still = np.repeat(train["video"][:3, :1], 4, axis=1)
    np.testing.assert_allclose(M.motion_step(still), 0.0, atol=1e-9)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown split"):
        M.load_moving_digits("test")
    with pytest.raises(ValueError, match="size - sprite"):
        M.load_moving_digits("train", 2, size=14, sprite=12)
    with pytest.raises(ValueError, match="positions must lie"):
        M.render(np.zeros((1, 8, 8)), np.array([[[17.0, 0.0]]]), 24)
