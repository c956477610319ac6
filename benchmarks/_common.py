"""Shared helpers for the benchmark scripts: timing, machine description, JSON + table output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def machine() -> dict[str, Any]:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}


def time_call(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=str, default=None, help="write the results as JSON to this path")
    return p


def emit(results: dict[str, Any], rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Print a table of ``rows`` and the JSON of ``results``; write the JSON when asked."""
    if rows:
        cols = list(rows[0])
        widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
    text = json.dumps(results, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
