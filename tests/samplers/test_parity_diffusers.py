"""Step-by-step parity with diffusers' schedulers on Stable Diffusion's schedule (float32).

Every step must satisfy ``max |ours - theirs| <= 1e-5`` in VP coordinates (``x_ve / sqrt(1 + sigma^2)``,
the common frame of all schedulers, where the states here are O(1)), and in each scheduler's own
coordinates ``<= 1e-5 * max(1, max |theirs|)`` (the VE-scaled Euler-family states reach ~40 at
sigma_max = 14.6, where one float32 ulp is already 4e-6).

An analytic epsilon model (tests/samplers/parity_common.py) stands in for the U-Net in both
frameworks. The committed references (tests/data/parity/sd_schedulers.npz, written by
make_parity_refs.py) keep this running without torch; the live test reruns diffusers.
Trajectories are produced in the scheduler's own coordinates: VP for DDPM, DDIM, DPM-Solver and
UniPC; VE-scaled for Euler, Euler ancestral and Heun.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

from jaxdiff import sampling, schedules
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.samplers import get_sampler

sys.path.insert(0, os.path.dirname(__file__))
import parity_common as pc  # noqa: E402

TOL = 1e-5
REFS = os.path.join(os.path.dirname(__file__), "..", "data", "parity", "sd_schedulers.npz")
AC = pc.alphas_cumprod()
DENOISER = DiscreteVPDenoiser(jax.tree_util.Partial(pc.eps_jax), AC, prediction="epsilon")


@pytest.fixture(scope="module")
def refs() -> dict[str, np.ndarray]:
    with np.load(REFS, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _ref(refs: dict, case: str, spacing: str) -> dict[str, np.ndarray]:
    prefix = f"{case}/{spacing}/"
    return {k[len(prefix):]: v for k, v in refs.items() if k.startswith(prefix)}


def _vp(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return x / np.sqrt(1.0 + sigma.astype(np.float64) ** 2).reshape((-1,) + (1,) * (x.ndim - 1))


def jaxdiff_trajectory(case: str, spacing: str) -> np.ndarray:
    """jaxdiff's trajectory for a case, in the reference scheduler's coordinates."""
    cls, _, name, options = pc.CASES[case]
    sampler = get_sampler(name, **options)
    sigmas = schedules.reference_schedule(cls, pc.STEPS, AC, spacing, 1, capacity=pc.STEPS)
    s = np.asarray(sigmas.values)
    x = pc.base_noise() * schedules.reference_init_sigma(cls, spacing, float(s[0]))
    if cls == "DDIMScheduler":  # diffusers' DDIM moves to sigma(t - T // n); see schedules.ddim_reference_targets
        targets = schedules.ddim_reference_targets(pc.STEPS, AC, spacing, 1)
        xs, x_vp = [_vp(x[None], s[:1])[0]], _vp(x[None], s[:1])[0]
        for i in range(pc.STEPS):
            x_ve = x_vp * np.sqrt(1.0 + s[i] ** 2)
            x_ve, _ = _ddim_step(sampler, x_ve, s[i], targets[i], jax.random.fold_in(jax.random.key(pc.KEY), i))
            x_vp = np.asarray(x_ve) / np.sqrt(1.0 + targets[i] ** 2)
            xs.append(x_vp)
        return np.stack(xs)
    xs, _ = sampling.trajectory(DENOISER, sampler, sigmas, x, jax.random.key(pc.KEY))
    xs = np.asarray(xs)
    return _vp(xs, s) if schedules.reference_state_is_vp(cls) else xs


@jax.jit
def _ddim_step(sampler, x, sigma, target, key):
    return sampler.step(lambda x_, s_: DENOISER(x_, s_), (), x, sigma, target, key)


def check_case(case: str, spacing: str, ref: dict[str, np.ndarray]) -> None:
    cls = pc.CASES[case][0]
    ours = jaxdiff_trajectory(case, spacing)
    theirs = ref["traj"]
    assert ours.shape == theirs.shape
    if case == "ddpm_large":
        # diffusers adds sqrt(beta_t) z on the last step when its timestep is positive; Ho et al. (and jaxdiff) add none.
        t_last = int(ref["timesteps"][-1])
        extra = np.sqrt(1.0 - AC[t_last]) * pc.step_noise(pc.STEPS - 1) if t_last > 0 else 0.0
        ours = ours.copy()
        ours[-1] = ours[-1] + extra
    err = np.abs(ours - theirs).reshape(len(ours), -1).max(axis=1)
    assert err.max() <= TOL * max(1.0, float(np.abs(theirs).max())), f"{case}/{spacing}: per-step max |diff| {np.array2string(err, precision=2)}"
    if not schedules.reference_state_is_vp(cls):  # the common frame: VP coordinates, flat 1e-5
        levels = schedules.reference_schedule(cls, pc.STEPS, AC, spacing, 1, capacity=pc.STEPS).used()
        ours, theirs = _vp(ours, levels), _vp(theirs, levels)
    err_vp = np.abs(ours - theirs).reshape(len(ours), -1).max(axis=1)
    assert err_vp.max() <= TOL, f"{case}/{spacing}: per-step max |diff| in VP coordinates {np.array2string(err_vp, precision=2)}"
    if "sigmas" in ref:  # the schedule itself (Heun lists inner levels twice)
        theirs_s = ref["sigmas"] if cls != "HeunDiscreteScheduler" else np.concatenate([ref["sigmas"][:1], ref["sigmas"][1::2]])
        ours_s = schedules.reference_schedule(cls, pc.STEPS, AC, spacing, 1, capacity=pc.STEPS).used()
        np.testing.assert_allclose(ours_s, theirs_s, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spacing", pc.SPACINGS)
@pytest.mark.parametrize("case", list(pc.CASES))
def test_parity_with_committed_references(refs: dict, case: str, spacing: str) -> None:
    check_case(case, spacing, _ref(refs, case, spacing))


def test_ddim_targets_are_next_levels_for_leading_spacing() -> None:
    """For leading spacing DDIM's quirk is harmless: the runner's plain schedule is diffusers' DDIM."""
    targets = schedules.ddim_reference_targets(pc.STEPS, AC, "leading", 1)
    levels = schedules.reference_schedule("DDIMScheduler", pc.STEPS, AC, "leading", 1, capacity=pc.STEPS).used()
    np.testing.assert_allclose(targets, levels[1:], rtol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("spacing", pc.SPACINGS)
@pytest.mark.parametrize("case", list(pc.CASES))
def test_parity_live(case: str, spacing: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import make_parity_refs

    check_case(case, spacing, make_parity_refs.diffusers_trajectory(case, spacing))
