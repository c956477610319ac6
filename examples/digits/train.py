"""Train jaxdiff's built-in digits models and write their weights into jaxdiff/assets/digits/.

    python examples/digits/train.py                 # all four, in order
    python examples/digits/train.py digits          # one: digits, digits-ncsn, digits-classifier, digits-eval
    python examples/digits/train.py digits --steps 500 --out /tmp/assets   # a quick trial elsewhere

Each model's recipe is ``configs/<name>.json``; runs resume from ``/tmp/jaxdiff-digits/<name>``
(delete it to start over). The training record (time, steps/s, load average) lands in the model's
``config.json`` and, for a full run, in ``benchmarks/results/train_digits.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import ROOT, load_average, train_model

from benchmarks._common import machine
from jaxdiff import builtin

NAMES = ("digits-eval", "digits", "digits-ncsn", "digits-classifier")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=list(NAMES), help=f"models to train (default: all of {NAMES})")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (trials)")
    p.add_argument("--out", type=Path, default=builtin.ASSETS, help="where the model folders go")
    p.add_argument("--fresh", action="store_true", help="delete earlier checkpoints first")
    p.add_argument("--report", action="store_true", help="only rewrite the Markdown report from the JSON")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "train_digits.json")
    args = p.parse_args()
    if args.report:
        results = json.loads(args.results.read_text())
        results["machine"] = {**results["machine"], **machine()}
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        args.results.with_suffix(".md").write_text(report(results))
        return
    records = {}
    for name in args.names:
        if name not in NAMES:
            raise SystemExit(f"unknown model {name!r}; valid: {', '.join(NAMES)}")
        if args.fresh:
            shutil.rmtree(f"/tmp/jaxdiff-digits/{name}", ignore_errors=True)
        records[name] = train_model(name, steps=args.steps, out_dir=args.out)
        print(name, json.dumps(records[name]))
    if args.steps is None and args.out == builtin.ASSETS:
        path = args.results
        old = json.loads(path.read_text()) if path.exists() else {"models": {}}
        old["models"].update(records)
        old["total_seconds"] = round(sum(r["seconds"] for r in old["models"].values()), 1)
        old["machine"] = {**machine(), "load_at_end": load_average()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=1) + "\n")
        path.with_suffix(".md").write_text(report(old))


def report(results: dict) -> str:
    """A Markdown table of the training records."""
    m = results["machine"]
    lines = ["# Training the built-in digits models", "",
             f"{m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}, float32. The machine was shared with "
             "other jobs: the load averages (1, 5, 15 min) before and after each run are recorded; on 2 cores a "
             "load above 2 means the run got less than the whole machine.", "",
             "| model | images | steps | batch | seconds (incl. compile) | steps/s | final loss | load before | "
             "load after | held-out |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        held = r.get("held_out_accuracy", r.get("held_out_accuracy_noisy", "-"))
        if isinstance(held, dict):
            held = ", ".join(f"{k.replace('sigma_', 'sigma ')}: {v:.1%}" for k, v in held.items())
        elif isinstance(held, float):
            held = f"accuracy {held:.2%}"
        lines.append(f"| {name} | {r.get('train_images', 1500)} | {r['steps']} | {r['batch_size']} | {r['seconds']} | "
                     f"{r['steps_per_s']} | {r['final_loss']} | {r['load_before']} | {r['load_after']} | {held} |")
    lines += ["", f"Total: {results['total_seconds']} s ({results['total_seconds'] / 60:.1f} min).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
