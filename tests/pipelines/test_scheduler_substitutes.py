"""PNDM and LMS folders sample with documented stand-ins on the reference scheduler's own noise levels."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from jaxdiff.pipelines import schedulers
from jaxdiff.pipelines.schedulers import plan, training_schedule

# Stable Diffusion 1.5's scheduler_config.json (no timestep_spacing key: PNDM's own default, leading, applies)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_pndm_folder_uses_pndms_noise_levels_without_warning(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.PNDMScheduler.from_config(SD15)
    ref.set_timesteps(steps)
    ts = np.unique(ref.timesteps.numpy())[::-1]  # PLMS repeats one timestep for its warm-up
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    expected = np.append(np.sqrt((1 - ac[ts]) / ac[ts]), np.sqrt((1 - ac[0]) / ac[0]))  # final_alpha_cumprod
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan(training_schedule(SD15), steps)
    assert p.sampler_name == "dpmpp_2m" and p.threshold is None and p.quantize
    np.testing.assert_allclose(p.sigmas.used(), expected, rtol=1e-5)
    assert p.init_sigma == pytest.approx(np.sqrt(1 + expected[0] ** 2), rel=1e-6)  # N(0, I) in VP coordinates


@pytest.mark.parametrize("steps", [5, 20])
def test_lms_folder_uses_lms_sigmas_without_warning(steps):
    diffusers = pytest.importorskip("diffusers")
    cfg = {**SD15, "_class_name": "LMSDiscreteScheduler"}
    ref = diffusers.LMSDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan(training_schedule(cfg), steps)
    assert p.sampler_name == "dpmpp_2m" and p.threshold is None
    np.testing.assert_allclose(p.sigmas.used(), ref.sigmas.numpy(), rtol=1e-5)
    assert p.init_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)


def test_unknown_scheduler_warns_once(monkeypatch):
    monkeypatch.setattr(schedulers, "_WARNED", set())
    train = training_schedule({**SD15, "_class_name": "KDPM2DiscreteScheduler"})
    with pytest.warns(UserWarning, match="KDPM2DiscreteScheduler has no jaxdiff equivalent") as record:
        plan(train, 4)
        plan(train, 6)
    assert len([w for w in record if "KDPM2" in str(w.message)]) == 1
