"""A/B of two checkouts: jaxdiff's Stable Diffusion sampling time, the same folder, worker processes interleaved.

Each round runs ``benchmarks/sampler_throughput.py --worker jaxdiff`` from checkout A, then from checkout B
(each with its own ``PYTHONPATH``), on one mid-size random SD folder built once (DPM-Solver++ 2M, 20 steps,
CFG 7.5, batch 4 by default). Reports seconds per batch per process and ``b_over_a_throughput`` (median A time
over median B time: above 1, B is faster). Use it to check that a change costs no sampling speed, e.g.
``git worktree add /tmp/base <commit>`` then ``python benchmarks/throughput_ab.py --a /tmp/base --b .``.

Usage: ``python benchmarks/throughput_ab.py --a PATH --b PATH [--rounds 3] [--batch 4] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's jaxdiff
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine  # noqa: E402
from sampler_throughput import build_folder  # noqa: E402


def worker(tree: Path, folder: Path, batch: int) -> float:
    cmd = [sys.executable, str(tree / "benchmarks" / "sampler_throughput.py"), "--worker", "jaxdiff", "--model",
           str(folder), "--batch", str(batch), "--steps", "20", "--guidance", "7.5", "--repeats", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"worker of {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])["seconds_per_batch"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, type=Path)
    p.add_argument("--b", required=True, type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    trees = {"a": a.a.resolve(), "b": a.b.resolve()}
    times: dict[str, list[float]] = {"a": [], "b": []}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder("mid", Path(tmp))
        for _ in range(a.rounds):
            for name, tree in trees.items():
                times[name].append(worker(tree, folder, a.batch))
                load.append(os.getloadavg()[0])
                print(name, f"{times[name][-1]:.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"machine": machine(), "trees": {k: str(v) for k, v in trees.items()}, "batch": a.batch,
           "seconds_per_batch": times, "median_s": med, "b_over_a_throughput": med["a"] / med["b"],
           "load_average_1min": {"max": max(load), "samples": load}}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nb_over_a_throughput (batch {a.batch}): {out['b_over_a_throughput']:.3f} "
          f"(A {med['a']:.2f} s, B {med['b']:.2f} s per batch; max load {max(load):.2f})")


if __name__ == "__main__":
    main()
