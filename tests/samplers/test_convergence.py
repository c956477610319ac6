"""Convergence order on the probability-flow ODE of a Gaussian mixture, and DDIM inversion.

All solvers start from the same noisy points at sigma_max = 10 and stop at sigma_min = 0.05, before
the final jump to 0 (that jump is one denoising step for every solver and would add the same
first-order error everywhere). The reference endpoint is an adaptive Dopri5 solve at rtol = atol =
1e-7 over the whole range. The error is the RMS over samples; its log-log slope against the number
of steps is the order: ~1 for Euler / DDIM(eta=0), ~2 for Heun and DPM-Solver++(2M). With narrow,
well-separated modes a few samples switch modes at coarse step counts and dominate the RMS, so
the mixture here has std 1 on a ring of radius 4.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdiff import mixtures, sampling, schedules
from jaxdiff.samplers import DDIM, Dopri5, DPMSolverPP2M, Euler, Heun

SIGMA_MAX, SIGMA_MIN, CAP = 10.0, 0.05, 64
STEPS = (8, 12, 16, 24, 32)
MIX = mixtures.ring_2d(std=1.0)  # overlapping modes: a smooth flow, so the asymptotic order shows by 8 steps


def karras_levels(n: int) -> schedules.Sigmas:
    """n steps of Karras' rho = 7 spacing from SIGMA_MAX to SIGMA_MIN (no final 0)."""
    r = np.linspace(0.0, 1.0, n + 1)
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    return schedules.from_array((hi + r * (lo - hi)) ** 7, capacity=CAP)


@pytest.fixture(scope="module")
def problem() -> tuple[jax.Array, np.ndarray]:
    x = jax.random.normal(jax.random.key(0), (64, 2)) * SIGMA_MAX
    ref = sampling.sample(MIX, Dopri5(rtol=1e-7, atol=1e-7, max_steps=10000), schedules.from_array([SIGMA_MAX, SIGMA_MIN]),
                          x, 0)
    return x, np.asarray(ref)


@pytest.mark.parametrize("sampler, lo, hi", [(Euler(), 0.8, 1.3), (DDIM(eta=0.0), 0.8, 1.3),
                                             (Heun(), 1.7, 2.5), (DPMSolverPP2M(), 1.7, 2.5)],
                         ids=["euler", "ddim", "heun", "dpmpp_2m"])
def test_convergence_order(problem: tuple, sampler, lo: float, hi: float) -> None:
    x, ref = problem
    errs = [float(np.sqrt(np.mean((np.asarray(sampling.sample(MIX, sampler, karras_levels(n), x, 0)) - ref) ** 2)))
            for n in STEPS]
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    assert lo <= slope <= hi, f"order {slope:.2f}, errors {errs}"


def test_dopri5_reports_nfe_and_meets_tolerance(problem: tuple) -> None:
    x, ref = problem
    out, info = sampling.sample(MIX, Dopri5(rtol=1e-4, atol=1e-4), schedules.from_array([SIGMA_MAX, SIGMA_MIN]), x, 0,
                                return_info=True)
    st = info.state
    assert int(st.nfe) == 1 + 6 * (int(st.accepted) + int(st.rejected)) and int(st.accepted) >= 3
    assert float(np.abs(np.asarray(out) - ref).max()) < 1e-2


def test_ddim_inversion_reconstructs() -> None:
    """invert() then DDIM sampling returns the data, with a first-order error in the number of steps.

    DDIM inversion is the cheap approximate inverse (the denoiser is evaluated at the current point
    instead of the unknown previous one), so the reconstruction error halves when the steps double;
    a sample on the boundary between two modes may still flip, hence medians and the 90th percentile.
    """
    mix = mixtures.ring_2d()
    x0 = mix.sample(jax.random.key(1), 256)
    errs = {}
    for n in (250, 500):
        sigmas = schedules.karras(n, 0.002, 80.0, capacity=512)
        latent = sampling.invert(mix, x0, sigmas)
        assert float(np.std(np.asarray(latent))) > 40.0  # really at sigma_max = 80
        rec = sampling.sample(mix, DDIM(eta=0.0), sigmas, latent, 0)
        errs[n] = np.linalg.norm(np.asarray(rec) - np.asarray(x0), axis=-1)
    assert np.median(errs[500]) < 0.04 and np.percentile(errs[500], 90) < 0.1, np.percentile(errs[500], [50, 90])
    assert 1.6 < np.median(errs[250]) / np.median(errs[500]) < 2.8
    # partial inversion (image-to-image strength) up to sigmas.values[start], then sampling from there
    start = 250
    mid = sampling.invert(mix, x0, sigmas, start=start)
    rec = sampling.sample(mix, DDIM(eta=0.0), sigmas, mid, 0, start=start)
    assert np.median(np.linalg.norm(np.asarray(rec) - np.asarray(x0), axis=-1)) < 0.01
