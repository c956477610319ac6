"""Error against function evaluations for every sampler on an exact Gaussian-mixture target.

Deterministic solvers are judged by the endpoint error of the probability-flow ODE (RMS distance to a
reference solve from the same start: adaptive Dormand-Prince at rtol = atol = 1e-7); stochastic ones by the sliced Wasserstein
distance of their samples to exact samples, with the exact-vs-exact distance printed as the floor.
Function evaluations are counted at run time (a host callback inside the denoiser), so skipped
evaluations (Heun's last step, adaptive step rejection) are counted as they happen.

DDIM inversion is judged by its round trip: exact samples x0 are inverted up the schedule
(``sampling.invert`` with the denoiser at the current or, as diffusers, the target level), then
sampled back down with DDIM (eta = 0) from the same schedule; the error is the distance to x0.
Usage: ``python benchmarks/solver_accuracy.py [--json PATH] [--png PATH] [--only inversion]``
(``--only inversion`` updates just the ``inversion`` entry of an existing JSON file).
"""
from __future__ import annotations

import jax
import numpy as np

import json
from pathlib import Path

from _common import emit, machine, parser
from jaxdiff import metrics, mixtures, sampling, schedules
from jaxdiff.samplers import SAMPLERS, get_sampler

DETERMINISTIC = {"euler": {}, "ddim": {}, "heun": {}, "dpmpp_2m": {}, "unipc": {}}
STOCHASTIC = {"ddpm": {}, "euler_ancestral": {}, "dpmpp_2m_sde": {}, "pc": {}, "langevin": {"n_steps": 4}}
SCHEDULE = {"langevin": "ncsn_geometric"}  # annealed Langevin runs on its geometric levels; the rest on Karras
STEPS = (4, 8, 16, 32, 64, 128)
SIGMA_MIN, SIGMA_MAX = 0.01, 40.0


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations on the host."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def _tick(self):
        self.count += 1

    def __call__(self, x, sigma, cond=None):
        jax.debug.callback(self._tick, ordered=True)
        return self.inner(x, sigma, cond)


def run(sampler, steps: int, x, key, schedule: str = "karras"):
    counter = CountingDenoiser(MIX)
    sig = schedules.get_schedule(schedule)(steps, SIGMA_MIN, SIGMA_MAX, capacity=max(STEPS) * 16)
    out, info = sampling.sample(jax.tree_util.Partial(counter), sampler, sig, x, key, return_info=True)
    jax.effects_barrier()
    return np.asarray(out), counter.count, info


MIX = mixtures.random_mixture(jax.random.key(0), 8, 8)
INVERSION_STEPS = (10, 25, 50, 100, 250)


def inversion(n: int) -> list[dict]:
    """Round-trip error of DDIM inversion for both evaluation levels, on MIX and on the 2-D ring."""
    from jaxdiff.samplers import DDIM

    rows = []
    for label, mix in (("random_8d", MIX), ("ring_2d", mixtures.ring_2d())):
        x0 = mix.sample(jax.random.key(6), n)
        for steps in INVERSION_STEPS:
            sig = schedules.karras(steps, SIGMA_MIN, SIGMA_MAX, capacity=max(INVERSION_STEPS))
            for where in sampling.EVALUATE_AT:
                rec = sampling.sample(mix, DDIM(), sig, sampling.invert(mix, x0, sig, evaluate_at=where))
                err = np.linalg.norm(np.asarray(rec - x0), axis=-1)
                rows.append({"mixture": label, "steps": steps, "evaluate_at": where,
                             "median": float(np.median(err)), "rms": float(np.sqrt(np.mean(err**2))),
                             "p90": float(np.percentile(err, 90))})
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--png", default=None, help="write a log-log plot of error vs evaluations here")
    p.add_argument("--n", type=int, default=2000, help="samples per run")
    p.add_argument("--only", choices=("all", "inversion"), default="all",
                   help="'inversion': run only the DDIM round trips and update that entry of --json")
    args = p.parse_args()
    inv = inversion(args.n)
    if args.only == "inversion":
        results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
        results["inversion"] = {"schedule": {"name": "karras", "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
                                "samples": args.n, "machine": machine(), "rows": inv}
        emit(results, inv, args.json)
        return
    key = jax.random.key(1)
    x = sampling.initial_noise(jax.random.key(2), (args.n, MIX.dim), SIGMA_MAX, sigma_data=1.0)
    # Two levels, [sigma_max, sigma_min, 0]: Dopri5 integrates the first move adaptively, then denoises.
    ref, ref_nfe, _ = run(get_sampler("dopri5", rtol=1e-7, atol=1e-7, max_steps=100_000), 2, x, key)
    exact = np.asarray(MIX.sample(jax.random.key(3), args.n))
    floor = float(metrics.sliced_wasserstein(exact, np.asarray(MIX.sample(jax.random.key(4), args.n)), jax.random.key(5)))
    rows = []
    for name, opts in (DETERMINISTIC | STOCHASTIC).items():
        if name not in SAMPLERS:
            continue
        for steps in STEPS:
            out, nfe, _ = run(get_sampler(name, **opts), steps, x, key, SCHEDULE.get(name, "karras"))
            if name in DETERMINISTIC:
                err, kind = float(np.sqrt(np.mean((out - ref) ** 2))), "ode_rms"
            else:
                err, kind = float(metrics.sliced_wasserstein(out, exact, jax.random.key(5))), "sliced_w2"
            rows.append({"sampler": name, "steps": steps, "nfe": nfe, "metric": kind, "error": err})
    if "dopri5" in SAMPLERS:
        for tol in (1e-2, 1e-3, 1e-4, 1e-5):
            out, nfe, info = run(get_sampler("dopri5", rtol=tol, atol=tol), 2, x, key)
            rows.append({"sampler": "dopri5", "steps": f"tol={tol:g}", "nfe": nfe, "metric": "ode_rms",
                         "error": float(np.sqrt(np.mean((out - ref) ** 2)))})
    results = {"benchmark": "solver_accuracy", "machine": machine(), "mixture": {"modes": 8, "dim": 8},
               "schedule": {"name": "karras", "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
               "reference": {"sampler": "dopri5", "rtol": 1e-7, "atol": 1e-7, "nfe": ref_nfe},
               "sliced_w2_floor": floor, "rows": rows,
               "inversion": {"schedule": {"name": "karras", "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
                             "samples": args.n, "machine": machine(), "rows": inv}}
    emit(results, rows, args.json)
    if args.png:
        plot(rows, floor, args.png)


def plot(rows, floor, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind, title in ((axes[0], "ode_rms", "probability-flow ODE: RMS endpoint error"),
                            (axes[1], "sliced_w2", "stochastic samplers: sliced W2 to exact samples")):
        for name in dict.fromkeys(r["sampler"] for r in rows if r["metric"] == kind):
            pts = [(r["nfe"], r["error"]) for r in rows if r["sampler"] == name and r["metric"] == kind]
            ax.loglog(*zip(*pts), marker="o", label=name)
        if kind == "sliced_w2":
            ax.axhline(floor, color="k", ls="--", label="exact vs exact")
        ax.set_xlabel("function evaluations")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
