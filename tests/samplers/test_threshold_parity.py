"""x0 clipping and dynamic thresholding against diffusers, step by step, through the planning path.

diffusers' ``DDIMScheduler`` clips (``clip_sample``) or thresholds (``thresholding``) its x0 estimate and
then moves along the network's *own* noise estimate (``use_clipped_model_output=False``);
``DDPMScheduler`` forms its posterior mean from the clipped x0 and x_t; DPM-Solver++ and Heun step
with the clipped data estimate. Each case builds a scheduler config, lets
:func:`jaxdiff.pipelines.schedulers.plan` turn it into a sampler (+ a denoiser transform where one is
needed), runs it on Stable Diffusion's schedule with the analytic epsilon model of parity_common, and
compares every step with diffusers in VP coordinates (1e-5, as test_parity_diffusers). Clip ranges and
thresholds are chosen so that the clip bites (checked by
:func:`test_clipping_on_the_denoiser_instead_leaves_diffusers_ddim`).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance, sampling, samplers, schedules
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.pipelines import schedulers

sys.path.insert(0, os.path.dirname(__file__))
import parity_common as pc  # noqa: E402

TOL = 1e-5
CLIP = {"clip_sample": True, "clip_sample_range": 0.5}
THRESHOLD = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.2}
# case -> (diffusers class, extra config, jaxdiff sampler, sampler options, diffusers step() kwargs)
CASES = {
    "ddim_clip": ("DDIMScheduler", {**CLIP, "set_alpha_to_one": False}, "ddim", {}, {}),
    "ddim_clip_v": ("DDIMScheduler", {"prediction_type": "v_prediction", "set_alpha_to_one": True}, "ddim", {}, {}),
    "ddim_threshold_eta": ("DDIMScheduler", {**THRESHOLD, "set_alpha_to_one": False}, "ddim", {"eta": 0.7},
                           {"eta": 0.7}),
    "ddpm_clip": ("DDPMScheduler", {**CLIP, "variance_type": "fixed_small"}, "ddpm", {}, {}),
    "ddpm_threshold": ("DDPMScheduler", {**THRESHOLD, "variance_type": "fixed_small"}, "ddpm", {}, {}),
    "heun_clip": ("HeunDiscreteScheduler", CLIP, "heun", {}, {}),
    "dpmpp_2m_threshold": ("DPMSolverMultistepScheduler", {**THRESHOLD, "algorithm_type": "dpmsolver++",
                                                           "solver_order": 2}, "dpmpp_2m", {}, {}),
}


def config(case: str) -> dict:
    cls, extra, *_ = CASES[case]
    return {"_class_name": cls, **pc.SD_CONFIG, "timestep_spacing": "leading", **extra}


def _vp(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return x / np.sqrt(1.0 + sigma.astype(np.float64) ** 2).reshape((-1,) + (1,) * (x.ndim - 1))


def jaxdiff_trajectory(case: str, threshold_in_denoiser: bool = False) -> np.ndarray:
    """The run a pipeline makes from the folder's config: plan's sampler, plan's transform; VP coordinates.

    ``threshold_in_denoiser`` moves the sampler's clip onto the denoiser (jaxdiff's other semantics)."""
    cfg = config(case)
    train = schedulers.training_schedule(cfg)
    p = schedulers.plan(train, pc.STEPS, CASES[case][2], capacity=pc.STEPS, **CASES[case][3])
    den = DiscreteVPDenoiser(jax.tree_util.Partial(pc.eps_jax), train.alphas_cumprod, prediction=train.prediction)
    sampler, transform = p.sampler, p.threshold
    if threshold_in_denoiser:
        sampler, transform = dataclasses.replace(sampler, threshold=None), sampler.threshold
    if transform is not None:
        den = guidance.apply(den, transform)
    x = pc.base_noise() * p.init_sigma
    xs, _ = sampling.trajectory(den, sampler, p.sigmas, x, jax.random.key(pc.KEY))
    return _vp(np.asarray(xs), np.asarray(p.sigmas.values))


def diffusers_trajectory(case: str) -> np.ndarray:
    import diffusers

    cls_name, _, _, _, step_kwargs = CASES[case]
    cls = getattr(diffusers, cls_name)
    sched = cls.from_config(config(case))
    sched.set_timesteps(pc.STEPS)
    traj, _ = pc.run_diffusers_scheduler(sched, step_kwargs)
    if schedules.reference_state_is_vp(cls_name):
        return traj
    sigmas = sched.sigmas.numpy()
    return _vp(traj, sigmas if cls_name != "HeunDiscreteScheduler" else np.concatenate([sigmas[:1], sigmas[1::2]]))


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return {case: diffusers_trajectory(case) for case in CASES}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_thresholded_schedulers_match_diffusers(references: dict, case: str) -> None:
    ours, theirs = jaxdiff_trajectory(case), references[case]
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs).reshape(len(ours), -1).max(axis=1)
    assert err.max() <= TOL, f"{case}: per-step max |diff| {np.array2string(err, precision=2)}"


@pytest.mark.parity
@pytest.mark.parametrize("case", ["ddim_clip", "ddim_threshold_eta"])
def test_clipping_on_the_denoiser_instead_leaves_diffusers_ddim(references: dict, case: str) -> None:
    """The same clip wrapped around the denoiser (noise re-derived from the clipped x0: jaxdiff's
    guidance.static_threshold semantics) leaves diffusers' DDIM by far more than the tolerance. The
    two placements agree wherever the clip does not bite, so this also shows the parity is not vacuous."""
    assert np.abs(jaxdiff_trajectory(case, threshold_in_denoiser=True) - references[case]).max() > 1e-2


def test_plan_puts_the_clip_into_ddim_and_ddpm_and_the_threshold_on_the_denoiser_elsewhere() -> None:
    ddim = schedulers.plan(schedulers.training_schedule(config("ddim_clip")), 4)
    assert ddim.threshold is None and ddim.sampler.threshold is not None
    assert schedulers.plan(schedulers.training_schedule(config("ddpm_clip")), 4).sampler.threshold is not None
    dpm = schedulers.plan(schedulers.training_schedule(config("dpmpp_2m_threshold")), 4)
    assert dpm.threshold is not None
    # a threshold passed as a sampler option replaces the config's, and is not applied twice
    own = guidance.static_threshold(-2.0, 2.0)
    mine = schedulers.plan(schedulers.training_schedule(config("ddim_clip")), 4, "ddim", threshold=own)
    assert mine.sampler.threshold is own and mine.threshold is None
    # Euler / Heun read no clip_sample or thresholding keys in diffusers: none applied
    euler = schedulers.plan(schedulers.training_schedule(config("ddim_threshold_eta")), 4, "euler")
    assert euler.threshold is None


@pytest.mark.parity
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_schedulers_without_thresholding_ignore_it(cls: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    import inspect

    keys = inspect.signature(getattr(diffusers, cls).__init__).parameters
    assert "thresholding" not in keys and "clip_sample" not in keys
    assert schedulers.threshold_transform(cls, config("ddim_threshold_eta")) is None


@pytest.mark.parity
@pytest.mark.parametrize("cls", sorted({*schedulers.SAMPLER_OF_SCHEDULER, "PNDMScheduler", "LMSDiscreteScheduler"}))
def test_which_schedulers_read_clip_sample_and_thresholding(cls: str) -> None:
    """jaxdiff's tables of the classes that read the keys (and clip_sample's class default) are diffusers'."""
    import inspect

    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    assert ("thresholding" in params) == (cls in schedulers.THRESHOLDING_SCHEDULERS)
    assert ("clip_sample" in params) == (cls in schedulers.CLIP_SAMPLE_DEFAULT)
    if "clip_sample" in params:
        assert params["clip_sample"].default == schedulers.CLIP_SAMPLE_DEFAULT[cls]


def test_ddim_threshold_keeps_the_network_noise_in_closed_form() -> None:
    """With ``D(x, s) = x - s e`` the network's noise is exactly ``e``: one deterministic DDIM step from s
    to s' is ``clip(x - s e) + s' e`` (diffusers' VP update divided by sqrt(abar')), not the
    ``clip(x0) + s' (x - clip(x0)) / s`` of a clipped denoiser."""
    rng = np.random.default_rng(0)
    x, e = rng.normal(size=(2, 5)).astype(np.float32) * 3, rng.normal(size=(2, 5)).astype(np.float32)
    s, s_next = np.float32(2.0), np.float32(0.5)
    den = lambda x_, sig: x_ - sig * e  # noqa: E731
    ddim = samplers.DDIM(threshold=guidance.static_threshold(-1.0, 1.0))
    got, _ = ddim.step(den, (), x, s, s_next, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(got), np.clip(x - s * e, -1, 1) + s_next * e, rtol=1e-6, atol=1e-6)
    ddpm = samplers.DDPM(threshold=guidance.static_threshold(-1.0, 1.0))  # posterior mean from clip(x0) and x
    got, _ = ddpm.step(den, (), x, s, jnp.float32(0.0), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(got), np.clip(x - s * e, -1, 1), rtol=1e-6, atol=1e-6)
