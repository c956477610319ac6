"""Editing and guidance by meaning on digits-sd, measured: Prompt-to-Prompt, null-text inversion, Palette and Semantic
Diffusion Guidance (issue 13), each from its own module, on held-out prompts and digits.

    python benchmarks/editing_quality.py --json benchmarks/results/editing_quality.json
    python benchmarks/editing_quality.py --parts p2p,sdg --num 40      # a subset, smaller
    python benchmarks/editing_quality.py --parts p2p --update --json benchmarks/results/editing_quality.json
                                    # rerun one part into an existing report (the other parts' figures kept)

Parts (``benchmarks/_editing_<part>.py``, each ``run(num, seeds) -> dict``, its ``TARGETS`` and ``markdown``):

- ``p2p``: word swap of the digit (``p2p_target_accuracy``, ``p2p_structure_gain``), colour swap with local blending
  (``blend_outside_psnr_db``, ``blend_colour_accuracy``), re-weighting a thickness word (the ink-mass curve);
- ``realedit``: the digit word swap on held-out *real* digits after null-text inversion (the judge's target accuracy,
  similarity to the real image against plain generation, the reconstruction's PSNR);
- ``nulltext``: reconstruction of held-out real digits at guidance 7.5 after null-text inversion and after plain DDIM
  inversion (``null_text_psnr_db``, ``ddim_inversion_psnr_db``);
- ``palette``: inpainting, uncropping and restoration by the shipped ``digits-palette`` against an L2 regressor of the
  same network, and L1 against L2 diffusion losses (the ``palette`` section);
- ``sdg``: an unconditional digits-sd guided by digits-clip toward a reference image or text
  (``sdg_image_class_match``, ``sdg_text_accuracy``, the guidance-scale sweeps).
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

PARTS = ("p2p", "realedit", "nulltext", "palette", "sdg")


def part(name: str) -> Any:
    """The module that measures one part."""
    return importlib.import_module(f"benchmarks._editing_{name}")


def run(parts: tuple[str, ...] = PARTS, *, num: int | None = None, seeds: int | None = None) -> dict[str, Any]:
    """Every part's figures in one dictionary, their targets checked together."""
    results: dict[str, Any] = {"parts": list(parts)}
    targets: dict[str, tuple[str, float]] = {}
    for name in parts:
        module = part(name)
        t0 = time.perf_counter()
        figures = module.run(num=num, seeds=seeds)
        results.update(figures)
        results.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        results.setdefault("part_keys", {})[name] = sorted(figures)
        targets.update(module.TARGETS)
    figures = dict(results)
    for name in parts:  # a part may nest its figures under its own name (palette)
        if isinstance(results.get(name), dict):
            figures.update(results[name])
    results["targets"] = check_targets(figures, targets, keep_missing=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Editing and guidance by meaning on digits-sd", "", *targets_table(results["targets"]), ""]
    for name in results["parts"]:
        lines += [*part(name).markdown(results), f"({results['part_seconds'][name]} s)", ""]
    if results.get("updated_parts"):
        lines += [f"Parts {', '.join(results['updated_parts'])} rerun by `--update` (each part's time is its own; the "
                  "machine and time below are the latest rerun's); the others are kept from the earlier full run.", ""]
    return "\n".join(lines + machine_lines(results))


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old``'s report with the rerun parts' figures of ``new`` in place of theirs (a figure a rerun part no longer
    reports is dropped; per-part seconds and keys merged, every part's targets checked again, the parts rerun since
    the last full run listed); the machine and total seconds become the latest rerun's."""
    parts = [x for x in PARTS if x in old.get("parts", []) or x in new["parts"]]
    stale = {k for name in new["parts"] for k in old.get("part_keys", {}).get(name, [])}
    old = {k: v for k, v in old.items() if k not in stale}
    out = {**old, **new, "parts": parts, "part_seconds": {**old.get("part_seconds", {}), **new["part_seconds"]},
           "part_keys": {**old.get("part_keys", {}), **new["part_keys"]},
           "updated_parts": [x for x in PARTS if x in old.get("updated_parts", []) or x in new["parts"]]}
    figures, targets = dict(out), {}
    for name in parts:
        targets.update(part(name).TARGETS)
        if isinstance(out.get(name), dict):
            figures.update(out[name])
    out["targets"] = check_targets(figures, targets, keep_missing=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parts_parser(__doc__.splitlines()[0], PARTS, "held-out prompts / digits")
    p.add_argument("--update", action="store_true",
                   help="merge the parts run into the existing --json report instead of replacing it")
    args = p.parse_args(argv)
    parts = chosen_parts(p, args.parts, PARTS)
    if args.update and not (args.json and Path(args.json).is_file()):
        p.error("--update merges into an existing report: give --json with the path of one")
    md = markdown_path(args.json, args.md)
    t0 = time.perf_counter()
    results = run(parts, num=args.num, seeds=args.seeds)
    if args.update:
        import json

        results = merged(json.loads(Path(args.json).read_text()), results)
    return write_report(results, t0, args.json, md, markdown)


if __name__ == "__main__":
    main()
