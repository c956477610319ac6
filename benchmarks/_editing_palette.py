"""Palette (Saharia et al. 2022) on held-out 8x8 digits: diffusion (L2, the shipped ``digits-palette``) against the
paper's baselines, the same network trained as an L2 regressor and the diffusion model trained with an L1 loss.

Section ``palette`` of ``benchmarks/editing_quality.py``. Each of the 297 held-out digits is degraded once per task
(:func:`jaxdiff.data.degradations.degrade`, seeded: a 3-5 pixel box, half the image, blur + noise, JPEG at quality
5-20; masked pixels filled with Gaussian noise), then restored by each model (the diffusion models draw ``seeds``
samples per input with DPM-Solver++ 2M, 20 steps; inpainting and uncropping keep the known pixels). Per task:

- ``<task>_<model>_accuracy``: the ``digits-eval`` judge reads the true digit (all draws), ``<model>`` one of
  ``degraded`` (the source as it is), ``regression``, ``diffusion_l2``, ``diffusion_l1``;
- ``<task>_<model>_fd``: Frechet distance of the judge's features of the first draws to those of the 297 real
  held-out digits (the paper's FID; lower is better);
- ``<task>_<model>_diversity``: mean pairwise Euclidean distance (pixels in [-1, 1]) between the draws for the
  same input (the paper's claim: L2 gives more diverse samples than L1; the regressor has none);
- ``<task>_fd_ratio``: ``diffusion_l2_fd / regression_fd`` (the paper: diffusion is far better, < 1);
  ``<task>_diversity_ratio``: ``diffusion_l2 / diffusion_l1`` diversity (the paper: > 1).
"""
from __future__ import annotations

import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import check_targets, targets_table  # noqa: E402
from benchmarks.sample_quality import Judge, frechet_distance  # noqa: E402
from jaxdiff.data.degradations import TASKS, degrade  # noqa: E402
from jaxdiff.pipelines.palette import Palette, PaletteRegressor  # noqa: E402
from jaxdiff.train import load_digits_dataset  # noqa: E402

MODELS = ("degraded", "regression", "diffusion_l2", "diffusion_l1")
SEEDS = 4
STEPS = 20
TARGETS = {
    **{f"{t}_fd_ratio": ("<=", 1.0) for t in TASKS},
    **{f"{t}_diversity_ratio": (">=", 1.0) for t in TASKS},
    **{f"{t}_diffusion_l2_accuracy_gain": (">=", 0.0) for t in TASKS},
}


def diversity(draws: np.ndarray, k: int) -> float:
    """Mean over inputs and pairs of draws of ``||a - b||_2`` (draws of one input adjacent, ``k`` each)."""
    d = draws.reshape(-1, k, int(np.prod(draws.shape[1:])))
    return float(np.mean([np.linalg.norm(d[:, i] - d[:, j], axis=-1).mean() for i, j in combinations(range(k), 2)]))


def run(num: int | None = None, seeds: int | None = None) -> dict:
    """The figures (module docstring); ``num`` held-out digits (default all 297), ``seeds`` draws per input."""
    t0 = time.perf_counter()
    k = seeds or SEEDS
    held = load_digits_dataset()[1]
    x, y = held["x"][:num], held["label"][:num]
    judge = Judge()
    real = judge.feats(held["x"])
    models = {"regression": PaletteRegressor.from_builtin(), "diffusion_l2": Palette.from_builtin(),
              "diffusion_l1": Palette.from_builtin(variant="diffusion_l1")}
    out: dict[str, Any] = {"num": int(len(x)), "seeds": k, "steps": STEPS, "sampler": "dpmpp_2m"}
    for ti, task in enumerate(TASKS):
        source, mask = degrade(x, task, np.random.default_rng(1000 + ti))
        masked = task in ("inpaint", "uncrop")
        draws = {"degraded": source}
        for name, model in models.items():
            n = 1 if name == "regression" else k
            draws[name] = model(source, mask=mask if masked else None, known=x if masked else None, steps=STEPS,
                                seed=ti, samples=n) if n > 1 else model(source, mask=mask if masked else None,
                                                                         known=x if masked else None)
        for name, d in draws.items():
            n = len(d) // len(x)
            out[f"{task}_{name}_accuracy"] = round(float(np.mean(judge.predict(d) == np.repeat(y, n))), 4)
            out[f"{task}_{name}_fd"] = round(frechet_distance(judge.feats(d[::n]), real), 3)
            if name.startswith("diffusion"):
                out[f"{task}_{name}_diversity"] = round(diversity(d, n), 4)
        out[f"{task}_fd_ratio"] = round(out[f"{task}_diffusion_l2_fd"] / out[f"{task}_regression_fd"], 3)
        out[f"{task}_diversity_ratio"] = round(out[f"{task}_diffusion_l2_diversity"]
                                               / out[f"{task}_diffusion_l1_diversity"], 3)
        out[f"{task}_diffusion_l2_accuracy_gain"] = round(out[f"{task}_diffusion_l2_accuracy"]
                                                          - out[f"{task}_degraded_accuracy"], 4)
    out["palette_seconds"] = round(time.perf_counter() - t0, 1)
    return {"palette": out}


def markdown(results: dict) -> list[str]:
    """The report section: a table per task, the paper's claims checked, one line on method."""
    r = results["palette"]
    lines = ["## Palette: image-to-image diffusion by concatenation (Saharia et al. 2022)", "",
             f"`digits-palette` (one multi-task U-Net reading `concat([x_t, source])`, L2 loss) against the same "
             f"network as an L2 regressor and trained with an L1 loss; {r['num']} held-out digits, one degradation "
             f"each per task, {r['seeds']} draws per input ({r['sampler']}, {r['steps']} steps); judge `digits-eval`; "
             "FD to the real held-out digits in the judge's features; diversity: mean pairwise L2 distance of the "
             "draws for one input (pixels in [-1, 1]).", "",
             "| task | model | accuracy | FD | diversity |", "|---|---|---|---|---|"]
    for task in TASKS:
        for m in MODELS:
            div = r.get(f"{task}_{m}_diversity")
            lines.append(f"| {task} | {m} | {r[f'{task}_{m}_accuracy']:.3f} | {r[f'{task}_{m}_fd']:.2f} | "
                         f"{'-' if div is None else f'{div:.3f}'} |")
    lines += ["", *targets_table(check_targets(r, TARGETS)), ""]
    return lines


if __name__ == "__main__":
    import json

    res = run(*(int(a) for a in sys.argv[1:3]))
    print(json.dumps(res, indent=1))
    print("\n".join(markdown(res)))
