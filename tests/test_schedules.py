"""Schedules: the reference schedulers' timesteps and levels, traced step counts, validation."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jaxdiff import schedules

AC = schedules.alphas_cumprod(schedules.vp_betas("scaled_linear", 1000, 0.00085, 0.012))
REFS = os.path.join(os.path.dirname(__file__), "data", "parity", "sd_schedulers.npz")
CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
           "heun": "HeunDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


@pytest.mark.parametrize("case", list(CLASSES))
@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
def test_reference_timesteps_match_diffusers(case: str, spacing: str) -> None:
    """Timesteps diffusers produced (12 steps, steps_offset=1; committed) equal ours."""
    with np.load(REFS, allow_pickle=False) as f:
        theirs = f[f"{case}/{spacing}/timesteps"]
    if case == "heun":
        theirs = np.concatenate([theirs[:1], theirs[1::2]])
    round_linspace, drop_last, _ = schedules.REFERENCE_SCHEDULERS[CLASSES[case]]
    ours = schedules.vp_timesteps(12, spacing, 1000, 1, round_linspace=round_linspace, drop_last=drop_last, capacity=12)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-3)


def test_known_timesteps() -> None:
    """Spot values from the definitions (Lin et al. 2024, Table 2; diffusers' DPM/UniPC n + 1 spacing)."""
    t = lambda *a, **k: np.asarray(schedules.vp_timesteps(*a, capacity=a[0], **k)).tolist()  # noqa: E731
    assert t(10, "leading", 1000, 1) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert t(10, "trailing", 1000) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert t(4, "linspace", 1000) == [999, 666, 333, 0]
    assert t(4, "leading", 1000, 1, drop_last=True) == [801, 601, 401, 201]
    assert t(4, "linspace", 1000, drop_last=True) == [999, 749, 500, 250]  # round(749.25), round(499.5) = 500 (half to even)
    assert t(48, "trailing", 1000)[3] == 936  # 1000 - 3 * 1000/48 is just below 937.5 in float64


@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
def test_traced_step_count_matches_concrete_away_from_ties(spacing: str) -> None:
    f = jax.jit(lambda n: schedules.vp_timesteps(n, spacing, 1000, 1, drop_last=True, capacity=32))
    for n in (5, 10, 20, 25):
        traced, concrete = np.asarray(f(n))[:n], np.asarray(schedules.vp_timesteps(n, spacing, 1000, 1, drop_last=True,
                                                                                      capacity=32))[:n]
        assert np.abs(traced - concrete).max() <= 1.0  # at most a tie rounded the other way
    sig = jax.jit(lambda n: schedules.reference_schedule("EulerDiscreteScheduler", n, AC, spacing, capacity=32).values)
    np.testing.assert_allclose(np.asarray(sig(10))[:11],
                               schedules.reference_schedule("EulerDiscreteScheduler", 10, AC, spacing, capacity=32).used(),
                               rtol=1e-5)


def test_reference_schedule_ends_and_init_sigma() -> None:
    ddim = schedules.reference_schedule("DDIMScheduler", 10, AC, "leading", 1, capacity=10).used()
    assert ddim[-1] == pytest.approx(np.sqrt((1 - AC[0]) / AC[0]), rel=1e-6)  # set_alpha_to_one=False
    one = schedules.reference_schedule("DDIMScheduler", 10, AC, "leading", 1, set_alpha_to_one=True, capacity=10).used()
    assert one[-1] == 0.0
    euler = schedules.reference_schedule("EulerDiscreteScheduler", 10, AC, "linspace", capacity=10).used()
    assert euler[0] == pytest.approx(np.sqrt((1 - AC[-1]) / AC[-1]), rel=1e-6) and euler[-1] == 0.0
    assert schedules.reference_init_sigma("EulerDiscreteScheduler", "linspace", 14.6) == pytest.approx(14.6)
    assert schedules.reference_init_sigma("EulerDiscreteScheduler", "leading", 14.6) == pytest.approx(np.hypot(14.6, 1))
    assert schedules.reference_init_sigma("DDIMScheduler", "linspace", 14.6) == pytest.approx(np.hypot(14.6, 1))
    assert not schedules.reference_state_is_vp("HeunDiscreteScheduler") and schedules.reference_state_is_vp("UniPCMultistepScheduler")


def test_ddim_reference_targets() -> None:
    """diffusers' DDIM moves to sigma(t - T // n): the next timestep for leading, not for linspace."""
    train = np.sqrt((1 - AC) / AC)
    lin = schedules.ddim_reference_targets(12, AC, "linspace")
    ts = np.round(np.linspace(0, 999, 12)[::-1]).astype(int)
    np.testing.assert_allclose(lin[:-1], train[ts[:-1] - 83], rtol=1e-6)
    assert lin[-1] == pytest.approx(train[0])  # t = 0 -> -83 -> the final alpha


def test_bad_schedule_input() -> None:
    with pytest.raises(ValueError, match="unknown timestep spacing 'middle'"):
        schedules.vp_timesteps(10, "middle")
    with pytest.raises(ValueError, match="no reference schedule for 'LMSDiscreteScheduler'"):
        schedules.reference_schedule("LMSDiscreteScheduler", 10, AC)
    with pytest.raises(ValueError, match="strictly decrease.*jaxdiff.sampling.invert"):
        schedules.check_sigmas(schedules.from_array([0.5, 1.0, 2.0]))  # rising to the end: an inversion
    with pytest.raises(ValueError, match="strictly decrease.*jaxdiff.sampling.invert"):
        schedules.check_sigmas(schedules.from_array([2.0, 1.0, 1.5, 0.0]))


@pytest.mark.parametrize("make", [schedules.karras, schedules.exponential, schedules.linear])
def test_swapped_sigma_range_is_named(make) -> None:
    """sigma_min > sigma_max gives rising levels then 0: the error says the two are swapped (not `invert`)."""
    bad = make(5, 80.0, 0.01, capacity=8)
    with pytest.raises(ValueError, match="sigma_min and sigma_max are swapped") as err:
        schedules.check_sigmas(bad)
    assert "invert" not in str(err.value)


# ---- shared helpers -------------------------------------------------------------------------------

def test_vp_sigmas_inverts_abar_and_keeps_the_array_kind():
    ac = np.asarray(AC)
    sig = schedules.vp_sigmas(ac)
    assert isinstance(sig, np.ndarray) and sig.dtype == np.float32
    np.testing.assert_allclose(1.0 / (1.0 + sig.astype(np.float64) ** 2), ac, rtol=1e-6)  # abar = 1 / (1 + sigma^2)
    traced = jax.jit(schedules.vp_sigmas)(jax.numpy.asarray(ac))
    assert isinstance(traced, jax.Array)
    np.testing.assert_allclose(np.asarray(traced), sig, rtol=1e-6)


def test_vp_sigma_formula_is_written_once():
    """Every VP -> sigma conversion in the package goes through schedules.vp_sigmas (no copies drifting apart)."""
    import re
    from pathlib import Path

    pattern = re.compile(r"sqrt\(\(1(\.0)? - ")
    root = Path(schedules.__file__).parent
    copies = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py") if path.name != "schedules.py"
              for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line) and "``" not in line]
    assert not copies, copies


def test_ncsn_geometric_is_the_exponential_spacing():
    for n in (1, 2, 7, 10):
        geo = schedules.ncsn_geometric(n, 0.01, 1.0, capacity=16)
        exp = schedules.exponential(n, 0.01, 1.0, capacity=16)
        np.testing.assert_array_equal(geo.used(), exp.used())
        levels = geo.used().astype(np.float64)[:n]
        assert levels[0] == pytest.approx(1.0, rel=1e-6) and levels[-1] == pytest.approx(0.01 if n > 1 else 1.0, rel=1e-5)
        if n > 2:  # constant ratio between consecutive levels (Song & Ermon 2019, Sec. 4.2)
            np.testing.assert_allclose(levels[1:] / levels[:-1], 0.01 ** (1 / (n - 1)), rtol=1e-5)



def test_a_step_count_above_the_capacity_is_refused_when_the_schedule_is_built():
    for build in (lambda: schedules.karras(12, 0.1, 10.0, capacity=11),
                  lambda: schedules.exponential(12, 0.1, 10.0, capacity=11),
                  lambda: schedules.linear(12, 0.1, 10.0, capacity=11)):
        with pytest.raises(ValueError, match="12 steps exceed the schedule's capacity of 11"):
            build()
    assert int(schedules.karras(11, 0.1, 10.0, capacity=11).count) == 11
