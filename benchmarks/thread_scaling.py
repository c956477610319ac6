"""How jaxdiff and PyTorch scale from one core to two: the mid U-Net forward and a full SD sampling run.

Every measurement is a fresh process pinned with CPU affinity to the first N cores (set before jax and
torch start their thread pools; torch uses N threads):

- ``unet``: the mid U-Net forward at batch 2 (a CFG pair; ``model_speed.py``'s ``mid``: block channels
  64/128/256, 32x32x4 latents, text 77x512), median of ``--repeats`` calls after a warm-up;
- ``sd``: Stable Diffusion sampling, mid SD architecture (``sampler_throughput.py``'s ``mid``), batch 4,
  20 steps DPM-Solver++ 2M, CFG 7.5, median of ``--repeats`` calls after the compiling one.

Configurations: PyTorch at 1 and 2 threads; jaxdiff on one CPU device at 1 and 2 cores; jaxdiff's
default at 2 cores (one CPU device per core, the batch split over them). ``--rounds`` interleaved
passes over the configurations; each figure is the median over rounds (with its spread).

Keys: ``unet_two_core_speedup`` (jaxdiff 1-core time / 2-core time with its default),
``unet_two_core_speedup_one_device``, ``torch_unet_two_core_speedup``, ``unet_time_ratio_one_core`` /
``_two_cores`` (jaxdiff / PyTorch time), and the same with ``sd_`` for the sampling run
(``sd_throughput_ratio_*``: PyTorch time / jaxdiff time). The load average is recorded (``load``).

    python benchmarks/thread_scaling.py --json benchmarks/results/thread_scaling.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _common import LoadMonitor, emit, machine, parser, pin_cores, spread  # noqa: E402

# (framework, cores, CPU devices)
CONFIGS = [("torch", 1, 1), ("jaxdiff", 1, 1), ("torch", 2, 1), ("jaxdiff", 2, 1), ("jaxdiff", 2, 2)]


# ---- workers (one pinned process each) --------------------------------------------------------------

def unet_worker(framework: str, folder: Path, cores: int, devices: int, repeats: int) -> dict:
    import numpy as np

    from model_speed import UNET, UNET_BATCH

    cfg = UNET["mid"]
    rng = np.random.default_rng(0)
    s, d = cfg["sample_size"], cfg["cross_attention_dim"]
    x = rng.standard_normal((UNET_BATCH, s, s, 4), np.float32)
    t = np.full((UNET_BATCH,), 500.0, np.float32)
    ctx = rng.standard_normal((UNET_BATCH, 77, d), np.float32)
    if framework == "torch":
        import diffusers
        import torch

        model = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).eval()
        tx, tt, tc = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(ctx)

        def call() -> None:
            with torch.inference_mode():
                model(tx, tt, tc)
    else:
        import jax

        from jaxdiff import parallel
        from jaxdiff.convert import load_model_folder
        from jaxdiff.models._pure import PureModel

        model = PureModel.of(load_model_folder(folder))
        args = (x, t, ctx)
        mesh = parallel.batch_mesh(UNET_BATCH) if devices > 1 else None
        if mesh is not None:  # the batch split over the CPU devices, the weights replicated
            batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA))
            model, args = parallel.shard_params(model, mesh), tuple(jax.device_put(a, batch) for a in args)
        fn = jax.jit(lambda m, a, b, c: m(a, b, c))

        def call() -> None:
            fn(model, *args).block_until_ready()
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        runs.append(time.perf_counter() - t0)
    runs.sort()
    return {"seconds": runs[len(runs) // 2], "runs_s": runs, "first_call_s": first}


def sd_worker(framework: str, folder: Path, repeats: int, batch: int = 4, steps: int = 20) -> dict:
    if framework == "torch":
        from sampler_throughput import diffusers_worker

        r = diffusers_worker(str(folder), batch, steps, 7.5, repeats)
    else:
        from benchmarks import throughput

        r = throughput.run(model=str(folder), batch=batch, steps=steps, guidance=7.5, sampler="dpmpp_2m",
                           repeats=repeats)
    return {"seconds": r["seconds_per_batch"], "runs_s": r["runs_s"], "first_call_s": r["first_call_s"],
            "devices": r.get("devices", 1)}


def worker(a) -> None:
    cores = pin_cores(a.cores)  # before jax and torch start
    os.environ["JAXDIFF_CPU_DEVICES"] = str(a.devices)
    import torch

    torch.set_num_threads(a.cores)
    if a.case == "unet":
        out = unet_worker(a.framework, Path(a.folder), a.cores, a.devices, a.repeats)
    else:
        out = sd_worker(a.framework, Path(a.folder), a.repeats)
    if a.framework == "jaxdiff":
        import jax

        out["jax_devices"] = jax.device_count()
    print("RESULT " + json.dumps({**out, "affinity": cores, "torch_threads": torch.get_num_threads()}))


# ---- driver -----------------------------------------------------------------------------------------

def build_folders(root: Path, cases: list[str]) -> dict[str, Path]:
    folders = {}
    if "unet" in cases:
        import torch

        from model_speed import build_unet

        torch.manual_seed(0)
        model, _ = build_unet("mid")
        folders["unet"] = root / "unet"
        model.save_pretrained(folders["unet"], safe_serialization=True)
    if "sd" in cases:
        from sampler_throughput import build_folder

        folders["sd"] = build_folder("mid", root)
    return folders


def spawn(case: str, config: tuple, folder: Path, repeats: int) -> dict:
    framework, cores, devices = config
    cmd = [sys.executable, __file__, "--worker", case, "--framework", framework, "--cores", str(cores),
           "--devices", str(devices), "--folder", str(folder), "--repeats", str(repeats)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PYTHONPATH=str(HERE.parent)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{case} {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def name(config: tuple) -> str:
    framework, cores, devices = config
    return f"{framework}_{cores}core" + (f"_{devices}dev" if framework == "jaxdiff" else "")


def summarise(case: str, t: dict[str, float]) -> dict[str, float]:
    """Speedups (1-core time / 2-core time) and framework ratios from the median times ``t``."""
    j1, j2, j2one, t1, t2 = (t[k] for k in ("jaxdiff_1core_1dev", "jaxdiff_2core_2dev", "jaxdiff_2core_1dev",
                                            "torch_1core", "torch_2core"))
    if case == "unet":
        return {"unet_two_core_speedup": j1 / j2, "unet_two_core_speedup_one_device": j1 / j2one,
                "torch_unet_two_core_speedup": t1 / t2,
                "unet_time_ratio_one_core": j1 / t1, "unet_time_ratio_two_cores": j2 / t2}
    return {"sd_two_core_speedup": j1 / j2, "sd_two_core_speedup_one_device": j1 / j2one,
            "torch_sd_two_core_speedup": t1 / t2,
            "sd_throughput_ratio_one_core": t1 / j1, "sd_throughput_ratio_two_cores": t2 / j2}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cases", default="unet,sd", help="unet, sd or both; default both")
    p.add_argument("--rounds", type=int, default=2, help="interleaved passes over the configurations; default 2")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per process; default unet 10, sd 3")
    p.add_argument("--worker", default=None, choices=("unet", "sd"))
    p.add_argument("--framework", default=None, choices=("jaxdiff", "torch"))
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--folder", default=None)
    a = p.parse_args()
    if a.worker:
        a.case = a.worker
        return worker(a)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("thread_scaling needs at least two cores")
    cases = a.cases.split(",")
    results: dict = {"benchmark": "thread_scaling", "machine": machine(), "rounds": a.rounds, "cases": {}}
    rows = []
    with LoadMonitor() as load, tempfile.TemporaryDirectory() as tmp:
        folders = build_folders(Path(tmp), cases)
        for case in cases:
            repeats = a.repeats or (10 if case == "unet" else 3)
            raw: dict[str, list] = {name(c): [] for c in CONFIGS}
            for _ in range(a.rounds):
                for c in CONFIGS:
                    raw[name(c)].append(spawn(case, c, folders[case], repeats))
                    print(case, name(c), f"{raw[name(c)][-1]['seconds']:.4g} s", flush=True)
            times = {k: spread([r["seconds"] for r in v]) for k, v in raw.items()}
            med = {k: v["median"] for k, v in times.items()}
            results["cases"][case] = {"seconds": times, "raw": raw}
            results.update(summarise(case, med))
            rows += [{"case": case, "config": k, "ms": 1e3 * v["median"], "spread": v["rel_spread"]}
                     for k, v in times.items()]
    results["load"] = load.summary()
    if not results["load"]["quiet"]:
        print(f"warning: the load average reached {results['load']['load_max_1min']:.2f} on "
              f"{results['load']['cores']} cores; the figures are not those of a quiet machine", file=sys.stderr)
    emit(results, rows, a.json)


if __name__ == "__main__":
    main()
