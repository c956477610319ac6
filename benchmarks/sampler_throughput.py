"""Stable Diffusion sampling throughput: jaxdiff vs diffusers (PyTorch) on the same converted weights.

DPM-Solver++ 2M, 20 steps, classifier-free guidance 7.5, batch 1 and 4, on a tiny and a mid-size
SD-architecture model (random weights: the cost is the architecture's). Each measurement runs in its
own process (peak RSS per framework); the frameworks are interleaved, ``--rounds`` (>= 3) processes each
(jaxdiff with a cold persistent compilation cache first, warm after; diffusers). Reported: images/s (the
median of the processes' medians) with the spread over processes, first-call time and compile time
(first call minus a run) with a cold and with a warm cache, peak RSS. jaxdiff runs with its defaults
(on CPU the CFG batch split over one CPU device per core), diffusers with PyTorch's thread count.

The 1-minute load average is recorded before, during (sampled every 2 s) and after; when it exceeded
the core count at any point the ratios are not reported (``throughput_ratio`` null, with the reason):
PyTorch's thread pool collapses under contention, which inflates jaxdiff's lead.

    python benchmarks/sampler_throughput.py --json benchmarks/results/sampler_throughput.json \
        --md benchmarks/results/sampler_throughput.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import throughput  # noqa: E402


def build_folder(size: str, root: Path) -> Path:
    """A diffusers StableDiffusionPipeline with torch-initialised random weights, saved as safetensors."""
    import diffusers
    import torch
    import transformers

    from jaxdiff.models.tokenizers import clip_tokenizer_from_bpe

    cfg = throughput.SIZES[size]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                                  **cfg["text"]))
    scheduler = diffusers.PNDMScheduler.from_config(throughput.SCHEDULER)
    tok = clip_tokenizer_from_bpe()  # OpenAI CLIP's BPE file, shipped with jaxdiff
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = root / size
    pipe.save_pretrained(str(folder), safe_serialization=True)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": False}))
    return folder


def diffusers_worker(folder: str, batch: int, steps: int, guidance: float, repeats: int) -> dict:
    import diffusers
    import torch

    t0 = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0

    def call(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=[throughput.PROMPT] * batch, negative_prompt=[""] * batch, num_inference_steps=steps,
                 guidance_scale=guidance, generator=g, output_type="np")
        return time.perf_counter() - t

    first = call(0)
    runs = [call(i + 1) for i in range(repeats)]
    run = statistics.median(runs)
    return {"framework": "diffusers", "torch": torch.__version__, "threads": torch.get_num_threads(), "load_s": load,
            "batch": batch, "steps": steps, "images_per_s": batch / run, "seconds_per_batch": run, "runs_s": runs,
            "first_call_s": first, "compile_s": max(first - run, 0.0), "peak_rss_mb": throughput.peak_rss_mb()}


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "jaxdiff":
        if args.cache:
            from jaxdiff import compile_cache

            compile_cache.enable(args.cache)
        out = throughput.run(model=args.model, batch=args.batch, steps=args.steps, guidance=args.guidance,
                             sampler="dpmpp_2m", repeats=args.repeats)
    else:
        out = diffusers_worker(args.model, args.batch, args.steps, args.guidance, args.repeats)
    print("RESULT " + json.dumps(out))


def _spawn(kind: str, folder: Path, batch: int, a: argparse.Namespace, cache: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(folder), "--batch", str(batch),
           "--steps", str(a.steps), "--guidance", str(a.guidance), "--repeats", str(a.repeats)]
    if cache:
        cmd += ["--cache", cache]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _machine() -> dict:
    """benchmarks/_common.machine() plus the platform."""
    from _common import machine

    return {**machine(), "platform": platform.platform(), "python": platform.python_version()}


def measure_pair(folder: Path, batch: int, a: argparse.Namespace) -> dict:
    """``a.rounds`` jaxdiff and diffusers processes, interleaved; medians of the per-process medians."""
    from _common import spread

    cache = tempfile.mkdtemp(prefix="jaxdiff-cache-")
    jax_runs, torch_runs = [], []
    for _ in range(a.rounds):
        jax_runs.append(_spawn("jaxdiff", folder, batch, a, cache))  # the first with a cold cache
        torch_runs.append(_spawn("diffusers", folder, batch, a))
    js = spread([r["seconds_per_batch"] for r in jax_runs])
    ts = spread([r["seconds_per_batch"] for r in torch_runs])
    cold, warm = jax_runs[0], jax_runs[1]
    return {
        "batch": batch, "rounds": a.rounds,
        "jaxdiff_images_per_s": batch / js["median"], "diffusers_images_per_s": batch / ts["median"],
        "ratio": ts["median"] / js["median"],
        "jaxdiff_seconds_per_batch": js, "diffusers_seconds_per_batch": ts,
        "jaxdiff_devices": cold.get("devices", 1), "jaxdiff_mesh": cold.get("mesh"),
        "diffusers_threads": torch_runs[0]["threads"],
        "jaxdiff_first_call_s": cold["first_call_s"], "jaxdiff_compile_s": cold["compile_s"],
        "jaxdiff_compile_warm_cache_s": warm["compile_s"], "jaxdiff_first_call_warm_cache_s": warm["first_call_s"],
        "diffusers_first_call_s": torch_runs[0]["first_call_s"],
        "jaxdiff_peak_rss_mb": max(r["peak_rss_mb"] for r in jax_runs),
        "diffusers_peak_rss_mb": max(r["peak_rss_mb"] for r in torch_runs),
        "raw": {"jaxdiff": jax_runs, "diffusers": torch_runs},
    }


def table(results: dict) -> str:
    head = ("| size | batch | jaxdiff img/s (spread) | diffusers img/s (spread) | ratio | jaxdiff devices "
            "| jaxdiff compile s (cold / warm cache) | diffusers first call s | peak RSS MB (jaxdiff / diffusers) |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for size, entries in results["sizes"].items():
        for e in entries:
            ratio = "refused (load)" if e["ratio"] is None else f"{e['ratio']:.2f}"
            rows.append(f"| {size} | {e['batch']} | {e['jaxdiff_images_per_s']:.2f} "
                        f"({e['jaxdiff_seconds_per_batch']['rel_spread']:.0%}) "
                        f"| {e['diffusers_images_per_s']:.2f} ({e['diffusers_seconds_per_batch']['rel_spread']:.0%}) "
                        f"| {ratio} | {e['jaxdiff_devices']} "
                        f"| {e['jaxdiff_compile_s']:.1f} / {e['jaxdiff_compile_warm_cache_s']:.1f} "
                        f"| {e['diffusers_first_call_s']:.2f} | {e['jaxdiff_peak_rss_mb']:.0f} / "
                        f"{e['diffusers_peak_rss_mb']:.0f} |")
    m, load = results["machine"], results["load"]
    note = "" if load["quiet"] else f"\n\nRatios refused: {results['refused']}\n"
    return (f"Stable Diffusion sampling, DPM-Solver++ 2M, {results['steps']} steps, CFG {results['guidance']}, "
            f"random SD-architecture weights, {results['rounds']} interleaved processes a side (spread: "
            f"(max - min) / median over them); {m['cpu']}, {load['cores']} cores ({m['platform']}); load average "
            f"before {load['load_before'][0]:.2f}, max during {load['load_max_1min']:.2f}, after "
            f"{load['load_after'][0]:.2f}.\n\n" + head + "\n".join(rows)
            + f"\n\nthroughput_ratio (mid, batch 4): {results.get('throughput_ratio')}\n" + note)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process after the first")
    p.add_argument("--rounds", type=int, default=3, help="processes per framework, interleaved (at least 3)")
    p.add_argument("--max-load", type=float, default=None,
                   help="refuse the ratios when the 1-minute load average exceeds this; default the core count")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--worker", default=None, choices=("jaxdiff", "diffusers"))
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache", default=None)
    a = p.parse_args()
    if a.worker:
        return _worker(a)
    if a.rounds < 3:
        p.error("--rounds must be at least 3 (medians and spreads need them)")
    from _common import LoadMonitor, load_refusal

    results: dict = {"steps": a.steps, "guidance": a.guidance, "sampler": "dpmpp_2m", "rounds": a.rounds,
                     "machine": _machine(), "sizes": {}}
    with LoadMonitor(max_load=a.max_load) as load, tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            folder = build_folder(size, Path(tmp))
            results["sizes"][size] = [measure_pair(folder, int(b), a) for b in a.batches.split(",")]
            print(json.dumps({size: [{k: v for k, v in e.items() if k != "raw"} for e in results["sizes"][size]]}),
                  flush=True)
    results["load"] = load.summary()
    mid4 = [e for e in results["sizes"].get("mid", []) if e["batch"] == 4]
    results["throughput_ratio"] = mid4[0]["ratio"] if mid4 else None
    if not results["load"]["quiet"]:
        results["refused"] = load_refusal(results["load"], "ratios")
        print("ratios not reported: " + results["refused"], file=sys.stderr)
        results["throughput_ratio"] = None
        for entries in results["sizes"].values():
            for e in entries:
                e["ratio_measured_under_load"], e["ratio"] = e["ratio"], None
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    if a.md:
        Path(a.md).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
