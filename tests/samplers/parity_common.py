"""Shared definitions of the scheduler-parity cases (no torch needed)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules

STEPS = 12  # 1000 / 12 is not an integer: trailing and linspace exercise DDIM's prev-timestep quirk
SHAPE = (2, 3, 4, 4)
SPACINGS = ("leading", "trailing", "linspace")
KEY = 1234
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
# case -> (diffusers class, extra config, jaxdiff sampler name, options)
CASES = {
    "ddpm": ("DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_small"}, "ddpm", {"variance": "fixed_small"}),
    "ddpm_large": ("DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_large"}, "ddpm", {"variance": "fixed_large"}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, "ddim", {"eta": 0.0}),
    "euler": ("EulerDiscreteScheduler", {}, "euler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", {}),
    "heun": ("HeunDiscreteScheduler", {}, "heun", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                     "dpmpp_2m_sde", {}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "predict_x0": True, "solver_type": "bh2"}, "unipc", {}),
}


def alphas_cumprod() -> np.ndarray:
    return schedules.alphas_cumprod(schedules.vp_betas("scaled_linear", 1000, 0.00085, 0.012))


def eps_jax(x_vp: jax.Array, t: jax.Array, cond=None) -> jax.Array:
    """The analytic epsilon model ``x (0.5 + t/2000) + 0.1 tanh(x) + 0.05 cos(t / 160)`` (t per sample).

    Near the exact ``eps = sqrt(1 - abar) x`` of unit-Gaussian data, so trajectories stay O(1) and
    the comparison is in absolute terms; the tanh and cosine terms keep it nonlinear in x and t.
    """
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x_vp.ndim - 1))
    return x_vp * (0.5 + t / 2000.0) + 0.1 * jnp.tanh(x_vp) + 0.05 * jnp.cos(t / 160.0)


def eps_torch(x_vp, t):
    import torch

    t = torch.as_tensor(t, dtype=torch.float32)
    return x_vp * (0.5 + t / 2000.0) + 0.1 * torch.tanh(x_vp) + 0.05 * torch.cos(t / 160.0)


def base_noise() -> np.ndarray:
    """The standard normal the run starts from (scaled by each scheduler's initial sigma)."""
    return np.asarray(jax.random.normal(jax.random.key(KEY + 1), SHAPE, jnp.float32))


def step_noise(i: int) -> np.ndarray:
    """jaxdiff's noise for step i: ``jax.random.normal(fold_in(key, i))``."""
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(KEY), i), SHAPE, jnp.float32))


def run_diffusers_scheduler(sched, step_kwargs: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a diffusers scheduler (``set_timesteps`` already called) on :func:`eps_torch` from
    :func:`base_noise`, its ``randn_tensor`` replaced by :func:`step_noise` of the jaxdiff step each call
    belongs to. Returns the states after each completed step (Heun: every second call) and the timesteps."""
    import importlib

    import torch

    module = importlib.import_module(type(sched).__module__)
    heun = type(sched).__name__ == "HeunDiscreteScheduler"
    traj: list[np.ndarray] = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(step_noise(len(traj) - 1).copy()).to(dtype or torch.float32)

    original = getattr(module, "randn_tensor", None)
    module.randn_tensor = fake_randn
    try:
        x = torch.from_numpy(base_noise().copy()) * sched.init_noise_sigma
        traj.append(x.numpy().copy())
        n = len(sched.timesteps)
        for k, t in enumerate(sched.timesteps):
            x = sched.step(eps_torch(sched.scale_model_input(x, t), t), t, x, **(step_kwargs or {})).prev_sample
            if not (heun and k % 2 == 0 and k != n - 1):  # Heun: only completed steps
                traj.append(x.numpy().copy())
    finally:
        if original is None:
            del module.randn_tensor
        else:
            module.randn_tensor = original
    return np.stack(traj), sched.timesteps.numpy()
