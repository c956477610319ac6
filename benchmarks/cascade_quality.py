"""Cascaded text-to-image models trained here, measured (issue 15): each part from its own module.

    python benchmarks/cascade_quality.py --json benchmarks/results/cascade_quality.json
    python benchmarks/cascade_quality.py --parts digits --num 100      # a subset, smaller

Parts (``benchmarks/_cascade_<part>.py``, each ``run(num, seeds) -> dict``, its ``TARGETS`` and ``markdown``):

- ``digits``: the built-in ``digits-cascade`` (Imagen / DeepFloyd IF-style 8x8 base and 8x8 -> 32x32
  super-resolution with noise-conditioning augmentation): ``cascade_digit_accuracy``, colour accuracy, FD vs floor,
  ``sr_fd_with_aug`` / ``sr_fd_without_aug`` (the ablation trained without augmentation), dynamic vs static
  thresholding at high guidance;
- ``unclip``: the built-in ``digits-unclip`` (prior + decoder on digits-clip's embeddings): ``prior_embedding_cosine``,
  ``variation_class_preservation``, text-to-image accuracy through prior + decoder.

Each part's figures are stored under its own name; ``--png DIR`` writes sample grids of the parts that have images.
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    check_targets, chosen_parts, machine_lines, markdown_path, parts_parser, targets_table, write_report)

PARTS = ("digits", "unclip")


def part(name: str) -> Any:
    """The module that measures one part."""
    return importlib.import_module(f"benchmarks._cascade_{name}")


def run(parts: tuple[str, ...] = PARTS, *, num: int | None = None, seeds: int | None = None,
        png: Path | None = None) -> dict[str, Any]:
    """Every part's figures under its name, their targets checked together."""
    results: dict[str, Any] = {"parts": list(parts), "part_seconds": {}}
    targets: dict[str, dict[str, Any]] = {}
    for name in parts:
        module = part(name)
        t0 = time.perf_counter()
        figures = module.run(num=num, seeds=seeds)
        images = figures.pop("_images", None)
        if png is not None and images is not None:
            figures["pictures"] = pictures(png, name, images)
        results[name] = figures
        results["part_seconds"][name] = round(time.perf_counter() - t0, 1)
        targets.update(check_targets(figures, module.TARGETS, keep_missing=True))
    results["targets"] = targets
    return results


def pictures(folder: Path, name: str, images: dict[str, Any]) -> dict[str, str]:
    """A grid per image set (values in [-1, 1]), the first 40 of each."""
    import numpy as np

    from jaxdiff.builtin import save_grid

    out = {}
    for key, x in images.items():
        x = np.clip((np.asarray(x[:40], np.float32) + 1) / 2, 0, 1)
        scale = max(1, 128 // x.shape[1])
        out[key] = str(save_grid(x, Path(folder) / f"cascade_{name}_{key}.png", ncol=10, scale=scale))
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Cascaded text-to-image models", "", *targets_table(results["targets"]), ""]
    for name in results["parts"]:
        lines += [*part(name).markdown(results[name]), "", f"({results['part_seconds'][name]} s)", ""]
    return "\n".join(lines + machine_lines(results))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parts_parser(__doc__.splitlines()[0], PARTS, "held-out prompts")
    p.add_argument("--png", type=Path, default=None, help="write sample grids into this folder")
    args = p.parse_args(argv)
    parts = chosen_parts(p, args.parts, PARTS)
    md = markdown_path(args.json, args.md)
    t0 = time.perf_counter()
    return write_report(run(parts, num=args.num, seeds=args.seeds, png=args.png), t0, args.json, md, markdown)


if __name__ == "__main__":
    main()
