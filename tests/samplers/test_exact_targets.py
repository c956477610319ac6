"""Every sampler's output distribution matches an exact Gaussian-mixture target.

The denoiser is the mixture's exact ``E[x0 | x]``, so any remaining mismatch is the sampler's
(discretisation, SDE or Langevin mixing error). The yardstick: the sliced Wasserstein distance
from an exact reference set to another exact set of the same size (the "floor", averaged over four
sets). A sampler passes when its distance to the reference is within ``factor`` of the floor.

Factors, from the spread of exact-vs-reference distances over 12 independent exact sets:
d = 64 (8192 samples), ratios to the floor spanned 0.86-1.27 (sd ~0.1), so 1.5x is ~5 sd from the
mean yet rejects a bias comparable to the sampling noise; d = 2 (16384 samples, a 6-mode ring with
unequal weights), the distance is dominated by multinomial mode-weight fluctuations (W2 between
1-D empirical measures with gaps decays like n^-1/4) and ratios spanned 0.54-1.39 (sd ~0.22), so
2x. Negative controls (a 4-step Euler run; a mixture with reversed weights) show the check fails.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdiff import metrics, mixtures, sampling, schedules
from jaxdiff.samplers import Resample, get_sampler

pytestmark = pytest.mark.xla_optimized  # runs its programs more than it compiles them (tests/conftest.py)

CAP = 256
PROJ = jax.random.key(9)

# name, options, schedule: step counts chosen so each sampler's bias sits well below the floor
# (ODE solvers need few steps; ancestral/SDE samplers about 200; annealed Langevin NCSN-style
# eps / sigma_L^2 = 0.2 with 60 updates on each of 20 levels).
KARRAS = lambda n: schedules.karras(n, 0.002, 80.0, capacity=CAP)  # noqa: E731
CONFIGS = {
    "euler": ("euler", {}, lambda: KARRAS(100)),
    "ddim_eta0.5": ("ddim", {"eta": 0.5}, lambda: KARRAS(200)),
    "euler_ancestral": ("euler_ancestral", {}, lambda: KARRAS(200)),
    "ddpm_small": ("ddpm", {"variance": "fixed_small"}, lambda: KARRAS(200)),
    "ddpm_large": ("ddpm", {"variance": "fixed_large"}, lambda: KARRAS(200)),
    "heun_churn": ("heun", {"s_churn": 5.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.0}, lambda: KARRAS(40)),
    "dpmpp_2m": ("dpmpp_2m", {}, lambda: KARRAS(30)),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, lambda: KARRAS(60)),
    "unipc": ("unipc", {}, lambda: KARRAS(25)),
    "pc": ("pc", {"snr": 0.16, "n_corrector": 1}, lambda: KARRAS(200)),
    "dopri5": ("dopri5", {"rtol": 1e-4, "atol": 1e-4}, lambda: schedules.exponential(2, 0.002, 80.0, capacity=CAP)),
    "langevin": ("langevin", {"eps": 5e-4, "n_steps": 60},
                 lambda: schedules.ncsn_geometric(20, 0.05, 20.0, capacity=CAP)),
}


_sw = jax.jit(metrics.sliced_wasserstein, static_argnames="num_projections")


class Target:
    """A mixture, an exact reference set, and the floor: the mean distance of four fresh exact sets to it."""

    def __init__(self, mix: mixtures.GaussianMixture, n: int, projections: int, factor: float):
        self.mix, self.n, self.projections, self.factor = mix, n, projections, factor
        self.reference = mix.sample(jax.random.key(100), n)
        self.floor = float(np.mean([self.distance(mix.sample(jax.random.key(200 + j), n)) for j in range(4)]))

    def distance(self, samples: jax.Array) -> float:
        return float(_sw(samples, self.reference, PROJ, num_projections=self.projections))


@pytest.fixture(scope="module", params=[2, 64], ids=["d2", "d64"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == 2:
        return Target(mixtures.ring_2d(), 16384, 64, 2.0)
    return Target(mixtures.random_mixture(jax.random.key(3), 5, 64), 8192, 128, 1.5)


# Resample: the wrapped step taken 3 times per level, re-noised in between; an exact inner transition keeps every
# marginal, so the same check applies (a missing or wrong re-noising shrinks or inflates the spread). DPM++ 2M's
# later passes are first order (fresh memory), so it needs Euler's step count.
RESAMPLED = {"resample3_ddpm_small": (("ddpm", {"variance": "fixed_small"}), lambda: KARRAS(200)),
             "resample3_dpmpp_2m": (("dpmpp_2m", {}), lambda: KARRAS(100))}


def run(target: Target, name: str, options: dict, sigmas: schedules.Sigmas, mix=None, repeats: int = 1) -> jax.Array:
    x = sampling.initial_noise(jax.random.key(5), (target.n, target.mix.dim), sigmas.values[0])
    sampler = get_sampler(name, **options)
    sampler = sampler if repeats == 1 else Resample(sampler, repeats)
    return sampling.sample(target.mix if mix is None else mix, sampler, sigmas, x, jax.random.key(6))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sampler_matches_exact_target(target: Target, config: str) -> None:
    name, options, make = CONFIGS[config]
    d = target.distance(run(target, name, options, make()))
    assert d <= target.factor * target.floor, f"{config}: SW {d:.4f} vs exact-vs-exact floor {target.floor:.4f}"


@pytest.mark.parametrize("config", list(RESAMPLED))
def test_resampled_sampler_matches_exact_target(target: Target, config: str) -> None:
    (name, options), make = RESAMPLED[config]
    d = target.distance(run(target, name, options, make(), repeats=3))
    assert d <= target.factor * target.floor, f"{config}: SW {d:.4f} vs exact-vs-exact floor {target.floor:.4f}"


def test_check_fails_for_wrong_samples(target: Target) -> None:
    """Negative controls: a 4-step Euler run and a mixture with reversed weights are rejected."""
    coarse = target.distance(run(target, "euler", {}, KARRAS(4)))
    mix = target.mix
    wrong_mix = mixtures.GaussianMixture(mix.means, mix.variances, mix.log_weights[::-1], mix.component_classes,
                                         mix.num_classes)
    wrong = target.distance(run(target, "euler", {}, KARRAS(100), mix=wrong_mix))
    assert coarse > 2 * target.factor * target.floor and wrong > target.factor * target.floor, (coarse, wrong, target.floor)
