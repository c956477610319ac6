"""Noise schedules: decreasing noise levels ``sigmas`` ending at the final level (usually 0).

A schedule is a :class:`Sigmas` value: ``values`` padded to a fixed capacity plus the number of
steps in use, ``count``. Every function here is written in ``jax.numpy`` with the step count as a
(possibly traced) argument, so a compiled sampler serves any step count up to the capacity.
Step ``i`` goes from ``values[i]`` to ``values[i + 1]``; entries after ``values[count]`` repeat it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._pytree import pytree_dataclass

Array = jax.Array
DEFAULT_CAPACITY = 1000


@pytree_dataclass
class Sigmas:
    """Noise levels ``values`` (capacity + 1,) of which the first ``count + 1`` are in use."""

    values: Array
    count: Array

    @property
    def capacity(self) -> int:
        return self.values.shape[0] - 1

    def used(self) -> np.ndarray:
        """The levels in use, as a host array (not traceable)."""
        return np.asarray(self.values)[: int(self.count) + 1]


def _pad(values: Array, count: Array, capacity: int) -> Sigmas:
    """Fill entries past ``values[count]`` with it, making the padding a no-op region."""
    if not isinstance(count, jax.core.Tracer) and int(count) > capacity:
        raise ValueError(f"{int(count)} steps exceed the schedule's capacity of {capacity}; "
                         "build it with a larger `capacity=`")
    idx = jnp.arange(capacity + 1)
    last = values[jnp.minimum(count, capacity)]
    return Sigmas(jnp.where(idx <= count, values, last), jnp.asarray(count, jnp.int32))


def _ramp(n: Array, capacity: int) -> Array:
    """``i / (n - 1)`` for i = 0..capacity (values past n - 1 are ignored by padding)."""
    i = jnp.arange(capacity + 1, dtype=jnp.float32)
    return i / jnp.maximum(jnp.asarray(n, jnp.float32) - 1.0, 1.0)


def _append_final(levels: Array, n: Array, final: Array | float) -> Array:
    """Put ``final`` at index n (levels holds the n noise levels in its first entries)."""
    idx = jnp.arange(levels.shape[0])
    return jnp.where(idx == n, final, levels)


def karras(n: Any, sigma_min: float, sigma_max: float, rho: float = 7.0, *, capacity: int = DEFAULT_CAPACITY) -> Sigmas:
    """Karras et al. 2022, eq. 5: ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""
    r = _ramp(n, capacity)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    levels = (hi + r * (lo - hi)) ** rho
    return _pad(_append_final(levels, n, 0.0), n, capacity)


def exponential(n: Any, sigma_min: float, sigma_max: float, *, capacity: int = DEFAULT_CAPACITY) -> Sigmas:
    """Levels evenly spaced in ``log sigma`` from sigma_max to sigma_min, then 0 (k-diffusion's
    ``get_sigmas_exponential``)."""
    r = _ramp(n, capacity)
    levels = jnp.exp(jnp.log(sigma_max) + r * (jnp.log(sigma_min) - jnp.log(sigma_max)))
    return _pad(_append_final(levels, n, 0.0), n, capacity)


def ncsn_geometric(n: Any, sigma_min: float = 0.01, sigma_max: float = 1.0, *,
                   capacity: int = DEFAULT_CAPACITY) -> Sigmas:
    """NCSN's geometric noise levels (Song & Ermon 2019, Sec. 4.2) for annealed Langevin dynamics, then 0.

    The n levels are those the dynamics run at; the final 0 marks the end of the run, where
    :class:`jaxdiff.samplers.Langevin` optionally denoises (its ``final_denoise``). Geometric is
    :func:`exponential` (even spacing in ``log sigma``) with NCSN's default range.
    """
    return exponential(n, sigma_min, sigma_max, capacity=capacity)


def linear(n: Any, sigma_min: float, sigma_max: float, *, capacity: int = DEFAULT_CAPACITY) -> Sigmas:
    """Levels evenly spaced in sigma from sigma_max to sigma_min, then 0."""
    r = _ramp(n, capacity)
    levels = sigma_max + r * (sigma_min - sigma_max)
    return _pad(_append_final(levels, n, 0.0), n, capacity)


def vp_continuous(
    n: Any, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3, *, capacity: int = DEFAULT_CAPACITY,
) -> Sigmas:
    """score_sde's VP-SDE grid: t evenly spaced from 1 to ``eps`` (Song et al. 2021), as sigmas, then 0."""
    r = _ramp(n, capacity)
    t = 1.0 + r * (eps - 1.0)
    log_abar = -0.5 * t * t * (beta_max - beta_min) - t * beta_min
    levels = jnp.sqrt(jnp.expm1(-log_abar))
    return _pad(_append_final(levels, n, 0.0), n, capacity)


# ---- discrete VP training schedules (DDPM, Stable Diffusion) -------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def vp_betas(kind: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
             beta_end: float = 0.012) -> np.ndarray:
    """Training betas (float32, as the reference implementations compute them).

    ``linear``: DDPM (Ho et al. 2020); ``scaled_linear``: Stable Diffusion (linear in sqrt(beta));
    ``squaredcos_cap_v2``: cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999.
    """
    T = num_train_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float32)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float32) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(T, dtype=np.float64)
        return np.minimum(1.0 - f((t + 1) / T) / f(t / T), 0.999).astype(np.float32)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` in float32."""
    return np.cumprod(1.0 - np.asarray(betas, np.float32), dtype=np.float32)


def vp_sigmas(alphas_cumprod_: Any) -> Any:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for every training step t (Song et al. 2021, eq. 29).

    The VE noise level of a VP marginal: ``x / sqrt(abar) = x0 + sigma eps``. A JAX array (or tracer)
    gives a JAX array, anything else a NumPy array; the dtype is the input's.
    """
    if isinstance(alphas_cumprod_, jax.Array):
        return jnp.sqrt((1.0 - alphas_cumprod_) / alphas_cumprod_)
    ac = np.asarray(alphas_cumprod_)
    return np.sqrt((1.0 - ac) / ac)


def _vp_timesteps_host(n: int, spacing: str, T: int, offset: int, round_linspace: bool, drop_last: bool,
                       capacity: int) -> np.ndarray:
    """:func:`vp_timesteps` for a concrete n, in NumPy float64 (the arithmetic of the reference schedulers)."""
    points = n + 1 if drop_last else n
    if spacing == "leading":
        t = (np.arange(points, dtype=np.float64) * (T // points))[::-1] + offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n))[:n] - 1.0
    else:
        t = np.linspace(0, T - 1, points)[::-1]
        t = np.round(t) if round_linspace else t.astype(np.float32)
    t = np.asarray(t[:n], np.float32)
    return np.concatenate([t, np.full(max(capacity - n, 0), t[-1], np.float32)])[:capacity]


def vp_timesteps(n: Any, spacing: str = "leading", num_train_timesteps: int = 1000, steps_offset: int = 0, *,
                 round_linspace: bool = True, drop_last: bool = False, capacity: int = DEFAULT_CAPACITY) -> Array:
    """Decreasing training timesteps for n sampling steps (Lin et al. 2024, Table 2 spacings).

    ``leading``: ``(n-1-i) * (T // n) + offset``; ``trailing``: ``round(T - i T / n) - 1``;
    ``linspace``: ``(n-1-i) (T-1) / (n-1)``, rounded when ``round_linspace`` (DDIM/DDPM) or
    fractional (the Euler family). ``drop_last`` spaces n + 1 points and drops the smallest, as
    diffusers' ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` do for leading
    (``(n-i) * (T // (n+1)) + offset``) and linspace (``round((n-i) (T-1) / n)``); trailing is unchanged.
    Returns (capacity,) floats; entries past n are unused. A concrete n is computed on the host in
    float64 with NumPy, as the reference schedulers do, so that ties round identically (e.g. trailing,
    n = 48: ``1000 - 3 * 1000/48`` lands just below 937.5 there); a traced n uses float32 and may
    differ from them by one timestep at such ties.
    """
    T = num_train_timesteps
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    if not isinstance(n, jax.core.Tracer):
        return jnp.asarray(_vp_timesteps_host(int(n), spacing, T, steps_offset, round_linspace, drop_last, capacity))
    i = jnp.arange(capacity, dtype=jnp.float32)
    n = jnp.asarray(n)
    nf = n.astype(jnp.float32)
    top = nf if drop_last else nf - 1.0  # index of the largest of the spaced points
    if spacing == "leading":
        return (top - i) * (T // (top.astype(jnp.int32) + 1)).astype(jnp.float32) + steps_offset
    if spacing == "trailing":
        return jnp.round(T - i * (T / nf)) - 1.0
    if spacing == "linspace":
        t = (top - i) * ((T - 1) / jnp.maximum(top, 1.0))
        return jnp.round(t) if round_linspace else t
    raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")


def vp_discrete(n: Any, alphas_cumprod_: Any, spacing: str = "leading", steps_offset: int = 0, *,
                final: str = "zero", round_linspace: bool = True, drop_last: bool = False,
                capacity: int = DEFAULT_CAPACITY) -> Sigmas:
    """Sigmas at the spaced training timesteps of a discrete VP schedule.

    Fractional timesteps interpolate ``sigma_t`` linearly in t, as the reference schedulers do.
    ``final="zero"`` ends at 0 (Euler, DPM-Solver); ``final="alpha_first"`` ends at ``sigma_0``
    (DDIM with ``set_alpha_to_one=False``, Stable Diffusion's setting); ``final="one"`` is 0 too.
    """
    train = vp_sigmas(jnp.asarray(alphas_cumprod_, jnp.float32))
    ts = vp_timesteps(n, spacing, train.shape[0], steps_offset, round_linspace=round_linspace, drop_last=drop_last,
                      capacity=capacity)
    levels = jnp.interp(ts, jnp.arange(train.shape[0], dtype=jnp.float32), train)
    if final in ("zero", "one"):
        end = 0.0
    elif final == "alpha_first":
        end = train[0]
    else:
        raise ValueError(f"unknown final level {final!r}; valid: zero, one, alpha_first")
    levels = jnp.concatenate([levels, levels[-1:]])
    return _pad(_append_final(levels, jnp.asarray(n), end), jnp.asarray(n), capacity)


# ---- the exact schedules of diffusers' schedulers (for parity and for porting pipelines) -------

# scheduler class -> (round linspace timesteps, space n + 1 points and drop the last, final level)
REFERENCE_SCHEDULERS: dict[str, tuple[bool, bool, str]] = {
    "DDPMScheduler": (True, False, "zero"),
    "DDIMScheduler": (True, False, "alpha_first"),
    "EulerDiscreteScheduler": (False, False, "zero"),
    "EulerAncestralDiscreteScheduler": (False, False, "zero"),
    "HeunDiscreteScheduler": (False, False, "zero"),
    "DPMSolverMultistepScheduler": (True, True, "zero"),
    "UniPCMultistepScheduler": (True, True, "zero"),
}
_VE_STATE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")


def _reference(scheduler: str) -> tuple[bool, bool, str]:
    try:
        return REFERENCE_SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"no reference schedule for {scheduler!r}; known: {', '.join(REFERENCE_SCHEDULERS)}") from None


def reference_schedule(scheduler: str, n: Any, alphas_cumprod_: Any, spacing: str = "leading", steps_offset: int = 0,
                       *, set_alpha_to_one: bool = False, capacity: int = DEFAULT_CAPACITY) -> Sigmas:
    """The noise levels diffusers' ``scheduler`` (a class name) visits for n steps, ending at its final level.

    Euler-family schedulers use fractional linspace timesteps; DPMSolverMultistep and UniPC space n + 1
    points and drop the last; DDIM ends at ``sigma_0`` unless ``set_alpha_to_one``. Heun's doubled
    timesteps are its two evaluations per step, which :class:`jaxdiff.samplers.Heun` makes inside one step.
    DDIM steps to ``t - T // n``, which is the next timestep only for leading spacing (and trailing when
    n divides T); :func:`ddim_reference_targets` gives its actual targets.
    """
    round_linspace, drop_last, final = _reference(scheduler)
    if scheduler == "DDIMScheduler" and set_alpha_to_one:
        final = "one"
    return vp_discrete(n, alphas_cumprod_, spacing, steps_offset, final=final, round_linspace=round_linspace,
                       drop_last=drop_last, capacity=capacity)


def ddim_reference_targets(n: int, alphas_cumprod_: Any, spacing: str = "leading", steps_offset: int = 0, *,
                           set_alpha_to_one: bool = False) -> np.ndarray:
    """The level diffusers' ``DDIMScheduler.step`` moves to from each timestep: ``sigma(t - T // n)``.

    Its ``prev_timestep`` arithmetic assumes leading spacing; with linspace (or trailing when n does
    not divide T) the state it returns is then read as if it were at the next listed timestep.
    """
    train = np.asarray(vp_sigmas(jnp.asarray(alphas_cumprod_, jnp.float32)))
    T = train.shape[0]
    ts = np.asarray(vp_timesteps(n, spacing, T, steps_offset, capacity=n)).astype(np.int64)
    prev = ts - T // n
    final = 0.0 if set_alpha_to_one else train[0]
    return np.where(prev >= 0, train[np.maximum(prev, 0)], final).astype(np.float32)


def reference_init_sigma(scheduler: str, spacing: str, sigma_max: float) -> float:
    """Standard deviation (VE coordinates) of the initial noise diffusers' pipelines draw for ``scheduler``.

    VP-state schedulers start from ``N(0, I)`` in VP coordinates, i.e. ``sqrt(1 + sigma_max^2)`` in VE;
    the Euler family uses ``init_noise_sigma``: ``sigma_max`` for linspace/trailing, ``sqrt(sigma_max^2 + 1)``
    for leading. Use it as ``initial_noise(key, shape, reference_init_sigma(...))``.
    """
    _reference(scheduler)
    if scheduler in _VE_STATE and spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float(np.sqrt(np.float32(sigma_max) ** 2 + 1.0))


def reference_state_is_vp(scheduler: str) -> bool:
    """Whether diffusers' ``scheduler`` keeps its sample in VP coordinates (``x_ve / sqrt(1 + sigma^2)``)."""
    _reference(scheduler)
    return scheduler not in _VE_STATE


SCHEDULES: dict[str, Callable[..., Sigmas]] = {
    "karras": karras,
    "exponential": exponential,
    "linear": linear,
    "ncsn_geometric": ncsn_geometric,
    "vp_continuous": vp_continuous,
    "vp_discrete": vp_discrete,
}


def get_schedule(name: str) -> Callable[..., Sigmas]:
    """Look a schedule up by name; an unknown name lists the valid ones."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}") from None


def check_sigmas(sigmas: Sigmas) -> None:
    """Validate a concrete schedule: count within 1..capacity, finite, non-negative, strictly decreasing."""
    count = int(sigmas.count)
    if count <= 0:
        raise ValueError(f"the number of steps must be positive, got {count}")
    if count > sigmas.capacity:
        raise ValueError(f"{count} steps exceed the schedule's capacity of {sigmas.capacity}; "
                         "build the schedule with a larger `capacity=`")
    used = sigmas.used()
    if not np.all(np.isfinite(used)) or np.any(used < 0):
        raise ValueError(f"sigmas must be finite and non-negative, got {used}")
    diffs = np.diff(used)
    levels = used[:-1]  # the noise levels, without the final one (a swapped range rises, then drops to it)
    if levels.size > 1 and np.all(np.diff(levels) > 0) and used[-1] < levels[-1]:
        raise ValueError(f"sigmas increase from {levels[0]:g} to {levels[-1]:g}: sigma_min and sigma_max are swapped; "
                         "pass sigma_min < sigma_max (e.g. karras(n, sigma_min=0.002, sigma_max=80))")
    if np.any(diffs >= 0):
        i = int(np.argmax(diffs >= 0))
        raise ValueError(f"sigmas must strictly decrease, but sigmas[{i}] = {used[i]:g} <= sigmas[{i + 1}] = "
                         f"{used[i + 1]:g}; to run noise levels upward (DDIM inversion) use jaxdiff.sampling.invert")


def from_array(values: Any, *, capacity: int | None = None) -> Sigmas:
    """A schedule from explicit levels (last entry is the final level)."""
    v = jnp.asarray(values, jnp.float32)
    n = v.shape[0] - 1
    cap = n if capacity is None else capacity
    if n > cap:
        raise ValueError(f"{n} steps exceed capacity {cap}")
    padded = jnp.concatenate([v, jnp.full((cap - n,), v[-1])])
    return Sigmas(padded, jnp.asarray(n, jnp.int32))
