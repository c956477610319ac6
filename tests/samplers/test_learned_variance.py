"""Learned variance (Nichol & Dhariwal 2021, eq. 15) against diffusers' ``DDPMScheduler(variance_type="learned_range")``.

An analytic six-channel "network" (the epsilon model of parity_common on three channels, a variance
interpolation ``v = tanh(...)`` in [-1, 1] on three more) runs through jaxdiff's planning path (the folder's
config -> ``DDPM(variance="learned_range")``, ``DiscreteVPDenoiser(learned_variance=True)``) and through
diffusers' scheduler with the same per-step noise; every step must agree in VP coordinates, with and without
DeepFloyd IF's dynamic thresholding. Guidance of the mean only is checked against its definition.
"""
from __future__ import annotations

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance, sampling, samplers
from jaxdiff.denoisers import DiscreteVPDenoiser, DropVariance
from jaxdiff.pipelines import schedulers

sys.path.insert(0, os.path.dirname(__file__))
import parity_common as pc  # noqa: E402

TOL = 1e-5
NHWC = (2, 4, 4, 3)
IF_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                 clip_sample=False, timestep_spacing="leading")
CASES = {
    "learned_range": {},
    "learned_range_threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5),
}


def _t(t, like):
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def net_jax(x_vp: jax.Array, t: jax.Array, cond=None) -> jax.Array:
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_vp.shape[0],))
    v = jnp.tanh(0.7 * x_vp + _t(t, x_vp) / 700.0 - 0.6)
    return jnp.concatenate([pc.eps_jax(x_vp, t), v], axis=-1)


def net_torch(x_vp, t):
    import torch

    v = torch.tanh(0.7 * x_vp + torch.as_tensor(t, dtype=torch.float32) / 700.0 - 0.6)
    return torch.cat([pc.eps_torch(x_vp, t), v], dim=1)


def start() -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(pc.KEY + 1), NHWC, jnp.float32))


def noise(i: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(pc.KEY), i), NHWC, jnp.float32))


def jaxdiff_trajectory(case: str) -> np.ndarray:
    train = schedulers.training_schedule({"_class_name": "DDPMScheduler", **IF_CONFIG, **CASES[case]})
    p = schedulers.plan(train, pc.STEPS, capacity=pc.STEPS)
    assert p.sampler.variance == "learned_range"
    den = DiscreteVPDenoiser(jax.tree_util.Partial(net_jax), train.alphas_cumprod, learned_variance=True)
    xs, _ = sampling.trajectory(den, p.sampler, p.sigmas, start() * p.init_sigma, jax.random.key(pc.KEY))
    sig = np.asarray(p.sigmas.values, np.float64).reshape(-1, 1, 1, 1, 1)
    return np.asarray(xs) / np.sqrt(1.0 + sig**2)


def diffusers_trajectory(case: str) -> np.ndarray:
    import diffusers
    import torch

    sched = diffusers.DDPMScheduler.from_config({**IF_CONFIG, **CASES[case]})
    sched.set_timesteps(pc.STEPS)
    module = importlib.import_module(type(sched).__module__)
    count = [0]

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        count[0] += 1
        return torch.from_numpy(noise(count[0] - 1).transpose(0, 3, 1, 2).copy())

    original, module.randn_tensor = module.randn_tensor, fake_randn
    try:
        x = torch.from_numpy(start().transpose(0, 3, 1, 2).copy())
        traj = [x.numpy().copy()]
        for t in sched.timesteps:
            x = sched.step(net_torch(x, t), t, x).prev_sample
            traj.append(x.numpy().copy())
    finally:
        module.randn_tensor = original
    return np.stack(traj).transpose(0, 1, 3, 4, 2)


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_learned_range_matches_diffusers_ddpm(case: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    ours, theirs = jaxdiff_trajectory(case), diffusers_trajectory(case)
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs).reshape(len(ours), -1).max(axis=1)
    assert err.max() <= TOL, f"{case}: per-step max |diff| {np.array2string(err, precision=2)}"


def test_the_variance_matters() -> None:
    """The learned variance changes the trajectory (so the parity above is not met by a fixed variance)."""
    train = schedulers.training_schedule({"_class_name": "DDPMScheduler", **IF_CONFIG})
    p = schedulers.plan(train, pc.STEPS, capacity=pc.STEPS)
    den = DiscreteVPDenoiser(jax.tree_util.Partial(net_jax), train.alphas_cumprod, learned_variance=True)
    x = start() * p.init_sigma
    learned = sampling.sample(den, p.sampler, p.sigmas, x, jax.random.key(pc.KEY))
    fixed = sampling.sample(DropVariance(den), samplers.DDPM(), p.sigmas, x, jax.random.key(pc.KEY))
    assert learned.shape == NHWC and float(jnp.abs(learned - fixed).max()) > 1e-2


def test_guidance_and_thresholds_act_on_the_mean_only() -> None:
    def net(x_vp, t, cond):  # the condition shifts both the prediction and the variance channels
        return jnp.concatenate([0.3 * x_vp + _t(cond, x_vp), jnp.tanh(x_vp) + 0.5 * _t(cond, x_vp)], axis=-1)

    train = schedulers.training_schedule({"_class_name": "DDPMScheduler", **IF_CONFIG})
    den = DiscreteVPDenoiser(jax.tree_util.Partial(net), train.alphas_cumprod, learned_variance=True)
    x, sigma = jnp.asarray(start()) * 3.0, jnp.float32(2.0)
    c, u = den(x, sigma, jnp.ones(2)), den(x, sigma, jnp.zeros(2))
    out = guidance.apply(den, guidance.classifier_free(4.0, jnp.zeros(2)))(x, sigma, jnp.ones(2))
    np.testing.assert_allclose(out[..., :3], u[..., :3] + 4.0 * (c[..., :3] - u[..., :3]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., 3:], c[..., 3:])
    clipped = guidance.apply(den, guidance.static_threshold(-0.5, 0.5))(x, sigma, jnp.ones(2))
    np.testing.assert_array_equal(clipped[..., :3], jnp.clip(c[..., :3], -0.5, 0.5))
    np.testing.assert_array_equal(clipped[..., 3:], c[..., 3:])
    assert DropVariance(den)(x, sigma, jnp.ones(2)).shape == x.shape


def test_mismatched_variance_is_an_error() -> None:
    train = schedulers.training_schedule({"_class_name": "DDPMScheduler", **IF_CONFIG})
    den = DiscreteVPDenoiser(jax.tree_util.Partial(net_jax), train.alphas_cumprod, learned_variance=True)
    x, s, key = jnp.asarray(start()), jnp.float32(2.0), jax.random.key(0)
    with pytest.raises(ValueError, match="DropVariance"):
        samplers.DDPM().step(lambda x_, s_: den(x_, s_), (), x, s, jnp.float32(1.0), key)
    with pytest.raises(ValueError, match="learned_variance=True"):
        samplers.DDPM(variance="learned_range").step(lambda x_, s_: DropVariance(den)(x_, s_), (), x, s,
                                                     jnp.float32(1.0), key)
    plain = DiscreteVPDenoiser(jax.tree_util.Partial(pc.eps_jax), train.alphas_cumprod, learned_variance=True)
    with pytest.raises(ValueError, match="twice the input"):
        plain(x, s)
    with pytest.raises(ValueError, match="variance_type 'learned'"):
        schedulers.plan(schedulers.training_schedule({"_class_name": "DDPMScheduler", "variance_type": "learned"}), 4)
