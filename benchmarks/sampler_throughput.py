"""Stable Diffusion sampling throughput: jaxdiff vs diffusers (PyTorch) on the same converted weights.

DPM-Solver++ 2M, 20 steps, classifier-free guidance 7.5, batch 1 and 4, on a tiny and a mid-size
SD-architecture model (random weights: the cost is the architecture's). Each measurement runs in its
own process (peak RSS per framework); the frameworks are interleaved (jaxdiff cold cache, diffusers,
jaxdiff warm cache, diffusers). Reported: images/s (median over the timed runs of both processes),
first-call time and compile time (first call minus a run) with a cold and with a warm persistent
compilation cache, peak RSS.

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

from jaxdiff.pipelines import throughput  # noqa: E402


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
    """benchmarks/_common.machine() plus the platform and the load when the run starts."""
    from _common import machine

    return {**machine(), "platform": platform.platform(), "python": platform.python_version(),
            "load_before": os.getloadavg()}


def measure_pair(folder: Path, batch: int, a: argparse.Namespace) -> dict:
    cache = tempfile.mkdtemp(prefix="jaxdiff-cache-")
    cold = _spawn("jaxdiff", folder, batch, a, cache)
    torch1 = _spawn("diffusers", folder, batch, a)
    warm = _spawn("jaxdiff", folder, batch, a, cache)
    torch2 = _spawn("diffusers", folder, batch, a)
    jr = statistics.median(cold["runs_s"] + warm["runs_s"])
    tr = statistics.median(torch1["runs_s"] + torch2["runs_s"])
    return {
        "batch": batch,
        "jaxdiff_images_per_s": batch / jr, "diffusers_images_per_s": batch / tr, "ratio": tr / jr,
        "jaxdiff_first_call_s": cold["first_call_s"], "jaxdiff_compile_s": cold["compile_s"],
        "jaxdiff_compile_warm_cache_s": warm["compile_s"], "jaxdiff_first_call_warm_cache_s": warm["first_call_s"],
        "diffusers_first_call_s": torch1["first_call_s"],
        "jaxdiff_peak_rss_mb": max(cold["peak_rss_mb"], warm["peak_rss_mb"]),
        "diffusers_peak_rss_mb": max(torch1["peak_rss_mb"], torch2["peak_rss_mb"]),
        "raw": {"jaxdiff_cold": cold, "jaxdiff_warm": warm, "diffusers": [torch1, torch2]},
    }


def table(results: dict) -> str:
    head = ("| size | batch | jaxdiff img/s | diffusers img/s | ratio | jaxdiff compile s (cold / warm cache) "
            "| diffusers first call s | peak RSS MB (jaxdiff / diffusers) |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for size, entries in results["sizes"].items():
        for e in entries:
            rows.append(f"| {size} | {e['batch']} | {e['jaxdiff_images_per_s']:.2f} "
                        f"| {e['diffusers_images_per_s']:.2f} "
                        f"| {e['ratio']:.2f} | {e['jaxdiff_compile_s']:.1f} / {e['jaxdiff_compile_warm_cache_s']:.1f} "
                        f"| {e['diffusers_first_call_s']:.2f} | {e['jaxdiff_peak_rss_mb']:.0f} / "
                        f"{e['diffusers_peak_rss_mb']:.0f} |")
    m = results["machine"]
    return (f"Stable Diffusion sampling, DPM-Solver++ 2M, {results['steps']} steps, CFG {results['guidance']}, "
            f"random SD-architecture weights; {m['cpu']}, {m['cores']} cores ({m['platform']}), shared machine "
            f"(load average before: {', '.join(f'{x:.1f}' for x in m['load_before'])}).\n\n" + head + "\n".join(rows)
            + f"\n\nthroughput_ratio (mid, batch 4): {results.get('throughput_ratio')}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--worker", default=None, choices=("jaxdiff", "diffusers"))
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache", default=None)
    a = p.parse_args()
    if a.worker:
        return _worker(a)
    results: dict = {"steps": a.steps, "guidance": a.guidance, "sampler": "dpmpp_2m", "machine": _machine(),
                     "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            folder = build_folder(size, Path(tmp))
            results["sizes"][size] = [measure_pair(folder, int(b), a) for b in a.batches.split(",")]
            print(json.dumps({size: [{k: v for k, v in e.items() if k != "raw"} for e in results["sizes"][size]]}),
                  flush=True)
    mid4 = [e for e in results["sizes"].get("mid", []) if e["batch"] == 4]
    results["throughput_ratio"] = mid4[0]["ratio"] if mid4 else None
    results["machine"]["load_after"] = os.getloadavg()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    if a.md:
        Path(a.md).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
