"""Shared helpers for the benchmark scripts: timing, machine description, JSON + table output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence


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
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}


def pin_cores(n: int) -> list[int]:
    """Restrict this process (and the thread pools it starts later) to the first ``n`` cores it may use.

    Call before importing jax or torch: XLA sizes its CPU thread pool from the affinity, OpenMP from
    ``OMP_NUM_THREADS``. Returns the cores kept (record them with the results)."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(allowed):
        raise SystemExit(f"asked for {n} cores; this process may use {len(allowed)} ({allowed})")
    keep = allowed[:n]
    os.sched_setaffinity(0, keep)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return keep


def _runnable_elsewhere(me: int) -> int:
    """Threads in state R (running or runnable) that belong to processes outside ``me``'s process tree."""
    parent, runnable = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            runnable[int(d.name)] = sum((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
                                        for t in (d / "task").iterdir())
        except (OSError, ValueError, IndexError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == me:
                return True
            pid = parent.get(pid, 0)
        return False

    return sum(n for pid, n in runnable.items() if not ours(pid))


class LoadMonitor:
    """The 1-minute load average before, during (sampled every ``every`` s) and after a ``with`` block, and
    the runnable threads of other processes (outside this one's tree) at each sample.

    ``quiet`` is False when the load average exceeded ``max_load`` (default: the core count) at any point:
    timings from such a run are not comparable (PyTorch's OpenMP pool collapses under contention)."""

    def __init__(self, every: float = 2.0, max_load: float | None = None) -> None:
        self.every, self.samples, self.others = every, [], []
        self.max_load = max_load
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])
            self.others.append(_runnable_elsewhere(os.getpid()))

    def __enter__(self) -> "LoadMonitor":
        self.before = os.getloadavg()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.after = os.getloadavg()

    def summary(self) -> dict[str, Any]:
        peak = max([self.before[0], self.after[0], *self.samples])
        cores = len(os.sched_getaffinity(0))
        limit = cores if self.max_load is None else self.max_load
        others = self.others or [0]
        return {"load_before": list(self.before), "load_after": list(self.after), "load_max_1min": peak,
                "load_samples": len(self.samples), "cores": cores, "max_load": limit, "quiet": peak <= limit,
                "others_runnable_mean": statistics.mean(others), "others_runnable_max": max(others)}


def load_refusal(load: dict[str, Any], what: str = "ratio") -> str:
    """Why a ratio measured under ``load`` (a :meth:`LoadMonitor.summary`) is not reported: the machine was busy."""
    return (f"the 1-minute load average reached {load['load_max_1min']:.2f} > {load['max_load']:g} "
            f"({load['cores']} cores; other processes' runnable threads: mean {load['others_runnable_mean']:.1f}, "
            f"max {load['others_runnable_max']}): the frameworks competed for the cores, the {what} would not be "
            "comparable; rerun on a quiet machine")


def check_targets(results: dict[str, Any], targets: dict[str, tuple[str, float]], *,
                  keep_missing: bool = False) -> dict[str, dict[str, Any]]:
    """Each target ``name: (">=" or "<=", bound)`` whose figure ``results`` holds: its text, value and whether met;
    with ``keep_missing`` also those it lacks (value None, not met: a figure that could not be measured)."""
    def met(k: str, op: str, v: float) -> bool:
        return k in results and bool(results[k] >= v if op == ">=" else results[k] <= v)

    return {k: {"target": f"{op} {v:g}", "value": results.get(k), "met": met(k, op, v)}
            for k, (op, v) in targets.items() if keep_missing or k in results}


def targets_table(checked: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table of :func:`check_targets`' result."""
    def value(t: dict[str, Any]) -> str:
        return "not measured" if t["value"] is None else f"{t['value']:.3f}"

    return ["| metric | target | value | met |", "|---|---|---|---|",
            *(f"| `{k}` | {t['target']} | {value(t)} | {'yes' if t['met'] else '**no**'} |" for k, t in checked.items())]


def generate_chunked(sd: Any, prompts: Sequence[str], seeds: Sequence[int], *, chunk: int = 64,
                     network_transform: Any = None, transform_for: Callable[[Any], Any] | None = None,
                     **kwargs: Any) -> Any:
    """One image per prompt from a Stable Diffusion recipe, prompt i with seed ``seeds[i]``, in batches of ``chunk``
    (the last padded with the last prompt) so one compiled program serves every batch; fewer prompts than a chunk
    (a tiny run) make one batch of their own size, not padded to a full chunk. ``transform_for(indices)`` builds a
    batch's network transform from its prompts' indices (e.g. their control images), else ``network_transform``
    serves all; ``kwargs`` go to the recipe (steps, sampler, guidance, ...)."""
    import numpy as np

    out, n = [], len(prompts)
    chunk = min(chunk, n)
    for i in range(0, n, chunk):
        idx = np.minimum(np.arange(i, i + chunk), n - 1)
        nt = network_transform if transform_for is None else transform_for(idx)
        images = sd([prompts[j] for j in idx], network_transform=nt, seed=[int(seeds[j]) for j in idx], **kwargs)
        out.append(np.asarray(images)[: min(chunk, n - i)])
    return np.concatenate(out)


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min, max and the relative spread ``(max - min) / median`` of repeated measurements."""
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs), "rel_spread": (max(xs) - min(xs)) / med if med else 0.0,
            "n": len(xs)}


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


def parts_parser(description: str, parts: Sequence[str], num_help: str) -> argparse.ArgumentParser:
    """:func:`parser` of a benchmark made of parts (``benchmarks/_<name>_<part>.py``): ``--md``, ``--parts``,
    ``--num`` (``num_help``), ``--seeds``."""
    p = parser(description)
    p.add_argument("--md", default=None, help="Markdown report (default: the JSON path with .md)")
    p.add_argument("--parts", default=",".join(parts), help="comma-separated subset of " + ",".join(parts))
    p.add_argument("--num", type=int, default=None, help=f"{num_help} per part (default: each part's own)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default: each part's own)")
    return p


def chosen_parts(p: argparse.ArgumentParser, spec: str, parts: Sequence[str]) -> tuple[str, ...]:
    """The parts ``--parts`` names, in its order; an unknown one is a usage error listing the valid ones."""
    chosen = tuple(x.strip() for x in spec.split(",") if x.strip())
    bad = [x for x in chosen if x not in parts]
    if bad:
        p.error(f"unknown parts {bad}; valid: {', '.join(parts)}")
    return chosen


def machine_lines(results: dict[str, Any]) -> list[str]:
    """The report's closing line: the machine and the run's wall time (none before :func:`write_report` ran)."""
    m = results.get("machine", {})
    if not m:
        return []
    return [f"Machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}; "
            f"{results.get('seconds', '-')} s in all.", ""]


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


def markdown_path(json_path: str | None, md: str | None) -> Path | None:
    """The Markdown report's path: ``--md``, else the JSON path with ``.md``, else none."""
    return Path(md) if md else (Path(json_path).with_suffix(".md") if json_path else None)


def write_report(results: dict[str, Any], started: float, json_path: str | None, md_path: Path | None,
                 markdown: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Add the machine and the wall time since ``started``, print the JSON, write it and the Markdown report."""
    results["machine"] = machine()
    results["seconds"] = round(time.perf_counter() - started, 1)
    emit(results, [], json_path)
    if md_path:
        md_path.write_text(markdown(results) + "\n")
    return results


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
