"""A standalone diffusers scheduler folder (``scheduler.save_pretrained``) becomes jaxdiff's schedule and sampler,
reproducing diffusers' noise levels and steps (analytic epsilon model of tests/samplers/parity_common.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff import sampling
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.pipelines.schedulers import load_scheduler

sys.path.insert(0, str(Path(__file__).parent.parent / "samplers"))
import parity_common as pc  # noqa: E402

CASES = {  # diffusers class -> extra config (each class's own defaults otherwise: DDIM leading, Euler linspace)
    "DDIMScheduler": {"clip_sample": False, "set_alpha_to_one": False},
    "EulerDiscreteScheduler": {},
}


def _vp(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return x / np.sqrt(1.0 + sigma.astype(np.float64) ** 2).reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parity
@pytest.mark.parametrize("cls", list(CASES))
def test_folder_reproduces_diffusers_scheduler(cls, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    getattr(diffusers, cls)(**pc.SD_CONFIG, **CASES[cls]).save_pretrained(tmp_path)
    ref = getattr(diffusers, cls).from_pretrained(tmp_path)
    ref.set_timesteps(pc.STEPS)
    train, plan = load_scheduler(tmp_path, pc.STEPS, capacity=pc.STEPS)
    assert plan.sampler_name == {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}[cls]
    np.testing.assert_allclose(train.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)  # float32 cumprod order
    assert train.prediction == "epsilon"
    # the noise levels diffusers visits: sigma(t) of its timesteps, then its final level
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    t = ref.timesteps.numpy().astype(np.float64)
    theirs = np.sqrt((1 - np.interp(t, np.arange(1000), ac)) / np.interp(t, np.arange(1000), ac))
    ours = np.asarray(plan.sigmas.values)[: int(plan.sigmas.count) + 1]
    if cls == "EulerDiscreteScheduler":
        np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(plan.init_sigma, float(ref.init_noise_sigma), rtol=1e-6)
    else:
        # diffusers' DDIM state is VP-scaled (init_noise_sigma 1); jaxdiff's is VE: the same start times sqrt(1 + s0^2)
        assert float(ref.init_noise_sigma) == 1.0
        np.testing.assert_allclose(plan.init_sigma, np.sqrt(1.0 + float(ours[0]) ** 2), rtol=1e-6)
    np.testing.assert_allclose(ours[:-1], theirs, rtol=1e-5)
    # a run of the analytic model: every state equal to diffusers' (in the scheduler's own coordinates)
    traj, _ = pc.run_diffusers_scheduler(ref)
    den = DiscreteVPDenoiser(jax.tree_util.Partial(pc.eps_jax), train.alphas_cumprod, train.prediction, plan.quantize)
    xs, _ = sampling.trajectory(den, plan.sampler, plan.sigmas, pc.base_noise() * plan.init_sigma,
                                jax.random.key(pc.KEY))
    xs = np.asarray(xs)
    if cls == "DDIMScheduler":  # DDIM's states are VP-scaled
        xs = _vp(xs, ours)
    assert xs.shape == traj.shape
    np.testing.assert_allclose(xs, traj, atol=1e-5 * max(1.0, float(np.abs(traj).max())), rtol=0)
    del torch


def test_file_itself_and_pipeline_folder_are_read(tmp_path):
    cfg = dict(pc.SD_CONFIG, _class_name="EulerDiscreteScheduler")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    a = load_scheduler(tmp_path / "scheduler" / "scheduler_config.json", 5)[1]
    b = load_scheduler(tmp_path, 5)[1]
    np.testing.assert_array_equal(np.asarray(a.sigmas.values), np.asarray(b.sigmas.values))
    assert a.sampler_name == "euler" and float(a.sigmas.values[0]) > 1.0
    _, c = load_scheduler(tmp_path, 5, sampler="ddim", schedule="karras")
    assert c.sampler_name == "ddim" and c.schedule_name == "karras"


def test_missing_file_and_unknown_class_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no scheduler_config.json"):
        load_scheduler(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scheduler(tmp_path / "nope.json", 5)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="unknown scheduler class 'UNet2DConditionModel'"):
        load_scheduler(tmp_path, 5)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    with pytest.raises(ValueError, match="no _class_name; pass sampler="):
        load_scheduler(tmp_path, 5)
    assert load_scheduler(tmp_path, 5, sampler="euler")[1].sampler_name == "euler"
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_scheduler(tmp_path, 5)


def test_unclip_scheduler_folder_is_its_ddpm_equivalent(tmp_path):
    """An UnCLIPScheduler folder plans DDPM with the learned variance and the timesteps diffusers' UnCLIPScheduler
    visits (linspace, squaredcos), without the substitution warning."""
    import warnings

    diffusers = pytest.importorskip("diffusers")
    diffusers.UnCLIPScheduler(variance_type="learned_range", clip_sample=True).save_pretrained(tmp_path)
    ref = diffusers.UnCLIPScheduler.from_pretrained(tmp_path)
    ref.set_timesteps(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, plan = load_scheduler(tmp_path, 7, capacity=7)
    assert plan.sampler_name == "ddpm" and plan.sampler.variance == "learned_range"
    assert plan.sampler.threshold is not None  # clip_sample
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    t = ref.timesteps.numpy()
    np.testing.assert_allclose(np.asarray(plan.sigmas.values)[:7], np.sqrt((1 - ac[t]) / ac[t]), rtol=1e-5)
