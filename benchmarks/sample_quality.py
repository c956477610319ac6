"""Sample quality of the built-in digits models, judged by a digit classifier trained here.

    python benchmarks/sample_quality.py --json benchmarks/results/sample_quality.json

The judge is ``digits-eval``, a small convnet trained on the first 1,000 of the 1,500 training
digits; its accuracy on the 297 held-out digits is reported. Its features of the other 500 training
digits against the held-out digits give ``fd_floor``: what a model reproducing its training data
would score (real digits the judge never saw, like generated ones). Every row (a model, sampler,
schedule and guidance) draws one sample per label of those 500 digits and reports:

- ``class_accuracy``: how often the judge reads the requested label (conditional rows);
- ``fd``: the Frechet distance (Heusel et al. 2017, the FID formula) between the judge's penultimate
  features of the samples and of the held-out digits.

Conditional rows ask for exactly the floor's labels because the distance moves by about the floor
itself when class proportions differ (e.g. 50 of each digit vs the held-out mix). Rows: DDPM
ancestral 1000 steps, DDIM 50, DPM-Solver++ 2M 20, Heun (EDM, Algorithm 1) 18, annealed Langevin
(NCSN), unconditional, classifier guidance, classifier-free guidance at several scales. Writes a
PNG grid per row (``sample_quality_<row>.png``, a row of the grid per digit) and a Markdown table
beside the JSON.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import emit, machine, parser  # noqa: E402
from jaxdiff import builtin, sampling  # noqa: E402
from jaxdiff.train import load_digits_dataset  # noqa: E402

CFG_SCALES = (1.0, 2.0, 3.0, 5.0)
CLASSIFIER_SCALES = (2.0, 4.0)


@dataclass(frozen=True)
class Row:
    """One configuration to sample: model, sampler, schedule, steps, guidance."""

    name: str
    model: str
    sampler: str
    schedule: str
    steps: int | None  # None: the model's stored default (Langevin's level count)
    guidance: float = 1.0
    classifier_scale: float = 0.0
    conditional: bool = True


def rows(cfg_scales: tuple[float, ...] = CFG_SCALES, classifier_scales: tuple[float, ...] = CLASSIFIER_SCALES) -> list[Row]:
    out = [
        Row("ddpm_1000", "digits", "ddpm", "vp_discrete", 1000),
        Row("ddim_50", "digits", "ddim", "vp_discrete", 50),
        Row("dpmpp_2m_20", "digits", "dpmpp_2m", "karras", 20),
        Row("heun_18", "digits", "heun", "karras", 18),
        Row("langevin_ncsn", "digits-ncsn", "langevin", "ncsn_geometric", None, conditional=False),
        Row("unconditional_dpmpp_2m_20", "digits", "dpmpp_2m", "karras", 20, guidance=0.0),
    ]
    out += [Row(f"classifier_guidance_{s:g}", "digits", "dpmpp_2m", "karras", 20, classifier_scale=s)
            for s in classifier_scales]
    out += [Row(f"cfg_{s:g}", "digits", "dpmpp_2m", "karras", 20, guidance=s) for s in cfg_scales]
    return out


# ---- the judge -------------------------------------------------------------------------------

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` of two feature sets (N, D).

    The trace of the matrix square root uses the symmetric form, whose eigenvalues are those of
    ``S_a S_b``, so only symmetric eigendecompositions are needed (no complex ``sqrtm``).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * np.sum(np.sqrt(np.clip(cross, 0.0, None))))


class Judge:
    """The evaluation classifier: labels and penultimate features of images in [-1, 1]."""

    def __init__(self) -> None:
        net = builtin.load_builtin("digits-eval")
        self.logits = jax.jit(lambda x: net(x))
        self.features = jax.jit(lambda x: net.bind("features")(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.argmax(self.logits(x), axis=-1))

    def feats(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.features(x))


def calibration_digits(train: dict, num: int) -> dict:
    """``num`` training digits the judge never saw (it trains on the first ``train_images`` of the split)."""
    start = builtin.builtin_config("digits-eval")["training"]["train_images"]
    if num > len(train["x"]) - start:
        raise SystemExit(f"--num {num} exceeds the {len(train['x']) - start} training digits the judge did not see")
    return {k: v[start:start + num] for k, v in train.items()}


# ---- sampling a row --------------------------------------------------------------------------

def steps_of(row: Row) -> int:
    if row.steps is not None:
        return row.steps
    return builtin.builtin_config(row.model)["sampling"]["langevin"]["num_levels"]


def sample_row(row: Row, labels: np.ndarray, seed: int) -> np.ndarray:
    """One sample of ``row`` in [-1, 1] per label (unconditional rows ignore the labels' values)."""
    num = len(labels)
    sigmas = builtin.make_sigmas(row.model, row.schedule, steps_of(row))
    labels = labels if row.model == "digits" else None
    den, cond = builtin.guided_denoiser(row.model, labels, guidance=row.guidance,
                                        classifier_scale=row.classifier_scale)
    key = jax.random.key(seed)
    x = sampling.initial_noise(jax.random.fold_in(key, 1), (num, 8, 8, 1), sigmas.values[0],
                               1.0 if row.model == "digits" else 0.0)
    sampler = builtin.default_sampler(row.model, row.sampler)
    return np.asarray(sampling.sample(den, sampler, sigmas, x, jax.random.fold_in(key, 2), cond))


def held_out_noise(real_feats: np.ndarray, held_feats: np.ndarray, repeats: int = 20) -> float:
    """Spread (std) of the floor when the held-out digits are resampled with replacement (a bootstrap).

    A rough scale for how much of a difference between rows is sampling noise.
    """
    rng = np.random.default_rng(0)
    n = len(held_feats)
    return float(np.std([frechet_distance(real_feats, held_feats[rng.integers(0, n, n)]) for _ in range(repeats)]))


def grid_order(labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` samples of each digit, digit by digit (a 10 x 10 grid)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])


def evaluate_row(row: Row, judge: Judge, held_feats: np.ndarray, labels: np.ndarray, seed: int,
                 png_dir: Path | None) -> dict:
    t0 = time.perf_counter()
    x = sample_row(row, labels, seed)
    seconds = time.perf_counter() - t0
    conditional = row.conditional and row.guidance != 0.0
    result = {"row": row.name, "model": row.model, "sampler": row.sampler, "schedule": row.schedule,
              "steps": steps_of(row), "guidance": row.guidance, "classifier_scale": row.classifier_scale,
              "class_accuracy": round(float(np.mean(judge.predict(x) == labels)), 4) if conditional else None,
              "fd": round(frechet_distance(judge.feats(x), held_feats), 3), "seconds": round(seconds, 1)}
    if png_dir is not None:
        shown = x[grid_order(labels)] if conditional else x[:100]
        builtin.save_grid((shown + 1.0) / 2.0, png_dir / f"sample_quality_{row.name}.png", ncol=10,
                          scale=6)
    return result


def targets(results: dict) -> list[str]:
    """The issue's three targets, with the measured values."""
    out = [f"- judge held-out accuracy >= 97%: {results['classifier_accuracy']:.2%}"]
    if "best_cfg_class_accuracy" in results:
        out.append(f"- classifier-free guidance class accuracy >= 95% at some scale >= 2: "
                   f"{results['best_cfg_class_accuracy']:.1%} at scale {results['best_cfg_scale']:g}")
    if "fd_dpmpp_2m_20" in results:
        out.append(f"- FD of DPM-Solver++ 2M, 20 steps, within 2x the floor: {results['fd_dpmpp_2m_20']:.3f} = "
                   f"{results['fd_dpmpp_2m_20_over_floor']:.2f} x floor")
    return out


def markdown(results: dict) -> str:
    lines = ["# Sample quality of the built-in digits models", "",
             f"Judge: `digits-eval`, held-out accuracy {results['classifier_accuracy']:.2%} on 297 digits. "
             f"{results['num']} samples per row; FD floor ({results['num']} real training digits the judge never saw, "
             "with the same labels as the conditional rows, vs the held-out digits): "
             f"{results['fd_floor']:.3f}.", "", *targets(results), "",
             "| row | sampler | schedule | steps | CFG | classifier | class accuracy | FD | FD / floor | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.1%}"
        lines.append(f"| {r['row']} | {r['sampler']} | {r['schedule']} | {r['steps']} | {r['guidance']:g} | "
                     f"{r['classifier_scale']:g} | {acc} | {r['fd']:.3f} | {r['fd'] / results['fd_floor']:.2f} | "
                     f"{r['seconds']} |")
    lines += ["", f"Sampling noise: resampling the held-out digits moves the floor by +-{results['fd_floor_bootstrap_std']:.2f} "
              "(bootstrap std): a rough scale of the noise in any one distance at this sample size. All rows share the "
              "same held-out digits and labels, so differences between rows are less noisy than that. Unconditional and Langevin rows choose their own class mix, which alone moves the distance "
              "by about the floor (conditional rows use the floor's exact labels).", ""]
    m = results["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}; load average "
              f"{results['load_average']}. Seconds include compilation.", ""]
    lines += ["Real training digits the judge never saw (the floor's), then each row: one row of the grid per digit for conditional rows.", "",
              "![real](sample_quality_real.png)"]
    lines += [f"![{r['row']}](sample_quality_{r['row']}.png)" for r in results["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=500, help="samples per row (and real digits for the floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=str, default=None, help="comma-separated row names (default: all)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other rows of an existing --json (same --num and --seed) and rerun only --rows")
    p.add_argument("--png-dir", type=str, default=None, help="where the PNG grids go (default: beside --json)")
    args = p.parse_args(argv)
    import os

    train, held = load_digits_dataset()
    judge = Judge()
    held_feats = judge.feats(held["x"])
    todo = rows()
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {r.name for r in todo})
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(r.name for r in todo)}")
        todo = [r for r in todo if r.name in wanted]
    png_dir = Path(args.png_dir) if args.png_dir else (Path(args.json).parent if args.json else None)
    real = calibration_digits(train, args.num)
    real_feats = judge.feats(real["x"])
    results: dict[str, Any] = {
        "classifier_accuracy": round(float(np.mean(judge.predict(held["x"]) == held["label"])), 4),
        "num": args.num, "seed": args.seed, "fd_floor": round(frechet_distance(real_feats, held_feats), 3),
        "fd_floor_bootstrap_std": round(held_out_noise(real_feats, held_feats), 3), "rows": []}
    if png_dir is not None:
        builtin.save_grid((real["x"][grid_order(real["label"])] + 1.0) / 2.0, png_dir / "sample_quality_real.png",
                          ncol=10, scale=6)
    for row in todo:
        results["rows"].append(evaluate_row(row, judge, held_feats, real["label"], args.seed, png_dir))
        print(results["rows"][-1], flush=True)
    if args.merge and args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        if (old["num"], old.get("seed", 0)) != (args.num, args.seed):
            raise SystemExit(f"--merge: {args.json} has num={old['num']}, seed={old.get('seed', 0)}; use the same")
        fresh = {r["row"]: r for r in results["rows"]}
        order = [r.name for r in rows()]
        merged = {**{r["row"]: r for r in old["rows"]}, **fresh}
        results["rows"] = sorted(merged.values(), key=lambda r: order.index(r["row"]) if r["row"] in order else 99)
    by_name = {r["row"]: r for r in results["rows"]}
    cfg = [r for r in results["rows"] if r["row"].startswith("cfg_") and r["guidance"] >= 2]
    if cfg:
        best = max(cfg, key=lambda r: r["class_accuracy"])
        results["best_cfg_class_accuracy"], results["best_cfg_scale"] = best["class_accuracy"], best["guidance"]
    if "dpmpp_2m_20" in by_name:
        results["fd_dpmpp_2m_20"] = by_name["dpmpp_2m_20"]["fd"]
        results["fd_dpmpp_2m_20_over_floor"] = round(results["fd_dpmpp_2m_20"] / results["fd_floor"], 3)
    results["machine"] = machine()
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    emit(results, [{k: r[k] for k in ("row", "class_accuracy", "fd", "seconds")} for r in results["rows"]],
         args.json)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
