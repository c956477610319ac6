"""IF-style two-stage cascade throughput: jaxdiff (one compiled program) vs diffusers' two pipelines (issue 15).

Random weights written by diffusers (``tests/pipelines/_if_folders.py``): stage I an ``IFPipeline`` (the U-Net of
diffusers' IF fast tests, widened: ``--blocks``, T5 text encoder, ``DDPMScheduler`` with ``learned_range``
variance and dynamic thresholding), stage II an ``IFSuperResolutionPipeline`` (the same U-Net family, 6 input
channels, the noise level as class labels). Both frameworks run stage I at ``--low`` px and stage II at ``--high``
px, ``--steps`` steps each, CFG ``--guidance``, ``--batch`` prompts given as embeddings (text encoding is not
timed on either side), noise level 250:

- jaxdiff: ``IFCascade(prompt_embeds=...)``: both stages, the augmentation and the thresholded learned-variance
  DDPM loops in one program;
- diffusers: ``IFPipeline(output_type="pt")`` then ``IFSuperResolutionPipeline`` on its output, PyTorch's threads
  (``torch.set_num_threads`` = the cores this process may use).

diffusers draws jaxdiff's noise (its ``randn_tensor`` replaced by jaxdiff's documented streams), so the two
frameworks' final images are compared too (max |difference|, tolerance 1e-3). One warm-up call each, then
``--rounds`` interleaved timed calls (jaxdiff, diffusers, ...), new seeds each round. Reported: images/s (median)
with the spread, ``cascade_throughput_ratio`` = diffusers' median seconds / jaxdiff's (target >= 1.25), jaxdiff's
compile time, and the load average before / during / after (reported whatever it was: the two frameworks run
interleaved, so both see the same load).

    taskset -c 0 python benchmarks/cascade_throughput.py --json benchmarks/results/cascade_throughput.json
    python benchmarks/cascade_throughput.py --low 8 --high 16 --steps 3,2 --rounds 1   # a quick check
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "pipelines"))

from benchmarks._common import LoadMonitor, check_targets, machine, markdown_path, parser, spread, targets_table  # noqa: E402

TARGET = 1.25
TOLERANCE = 1e-3
LEVEL = 250


class Pair:
    """The two frameworks on the same folders; ``jaxdiff(seed)`` / ``diffusers(seed)`` -> (seconds, final images)."""

    def __init__(self, root: Path, *, family: str, low: int, high: int, blocks: tuple, batch: int,
                 steps: tuple, guidance: tuple) -> None:
        import _if_folders as F
        import torch

        from jaxdiff.pipelines import deepfloyd_if as IF

        self.F = F
        p1, p2 = F.pipelines(family, text="t5", variance="learned_range", sizes=(low, high), blocks=blocks)
        F.save_cascade(p1, p2, root)
        t0 = time.perf_counter()
        self.casc = IF.IFCascade.from_pretrained(root)
        self.jaxdiff_load_s = time.perf_counter() - t0
        self.p1, self.p2 = p1, p2
        ids = torch.arange(batch * 8).reshape(batch, 8) % 90 + 3
        with torch.no_grad():  # prompt embeddings of the shared T5 (not timed on either side)
            self.embeds = p1.text_encoder(ids).last_hidden_state
            self.negative = p1.text_encoder(torch.ones_like(ids)).last_hidden_state
        self.low, self.high, self.batch, self.steps, self.guidance = low, high, batch, steps, guidance
        self.to_images = IF.to_images

    def jaxdiff(self, seed: int) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        _, high = self.casc(prompt_embeds=self.embeds.numpy(), negative_prompt_embeds=self.negative.numpy(),
                            steps=self.steps, guidance=self.guidance, noise_level=LEVEL, seed=seed)
        return time.perf_counter() - t0, high  # host arrays: finished

    def diffusers(self, seed: int) -> tuple[float, np.ndarray]:
        import torch

        F, b = self.F, self.batch
        first = F.stage_noise(seed, 0, (b, self.low, self.low, 3), self.steps[0], False)
        second = F.stage_noise(seed, 1, (b, self.high, self.high, 3), self.steps[1], True)
        text = dict(prompt_embeds=self.embeds, negative_prompt_embeds=self.negative)
        t0 = time.perf_counter()
        with torch.inference_mode():
            with F.injected_noise(first):
                low = self.p1(**text, num_inference_steps=self.steps[0], guidance_scale=self.guidance[0],
                              height=self.low, width=self.low, output_type="pt").images
            with F.injected_noise(second):
                high = self.p2(**text, image=low, num_inference_steps=self.steps[1], guidance_scale=self.guidance[1],
                               noise_level=LEVEL, height=self.high, width=self.high, output_type="np").images
        return time.perf_counter() - t0, np.asarray(high)


def measure(pair: Pair, rounds: int) -> dict[str, Any]:
    from jaxdiff.pipelines import deepfloyd_if as IF

    jax_first, jax_img = pair.jaxdiff(0)
    torch_first, torch_img = pair.diffusers(0)
    cache = IF.generate_jit._cache_size()
    diffs = [float(np.abs(jax_img - torch_img).max())]
    jax_runs, torch_runs = [], []
    for r in range(rounds):
        t, jax_img = pair.jaxdiff(r + 1)
        jax_runs.append(t)
        t, torch_img = pair.diffusers(r + 1)
        torch_runs.append(t)
        diffs.append(float(np.abs(jax_img - torch_img).max()))
        print(f"round {r + 1}: jaxdiff {jax_runs[-1]:.3f} s, diffusers {torch_runs[-1]:.3f} s, "
              f"max diff {diffs[-1]:.1e}", flush=True)
    js, ts = spread(jax_runs), spread(torch_runs)
    b = pair.batch
    return {
        "jaxdiff_images_per_s": b / js["median"], "diffusers_images_per_s": b / ts["median"],
        "cascade_throughput_ratio": ts["median"] / js["median"],
        "jaxdiff_seconds_per_batch": js, "diffusers_seconds_per_batch": ts,
        "jaxdiff_first_call_s": jax_first, "jaxdiff_compile_s": max(jax_first - js["median"], 0.0),
        "diffusers_first_call_s": torch_first, "jaxdiff_new_compiles_after_first": IF.generate_jit._cache_size() - cache,
        "max_abs_diff": max(diffs), "images_agree": max(diffs) <= TOLERANCE, "image_std": float(torch_img.std()),
        "raw_s": {"jaxdiff": jax_runs, "diffusers": torch_runs},
    }


def table(res: dict[str, Any]) -> str:
    m, load = res["machine"], res["load"]
    js, ts = res["jaxdiff_seconds_per_batch"], res["diffusers_seconds_per_batch"]
    checked = check_targets(res, {"cascade_throughput_ratio": (">=", TARGET)})
    return "\n".join([
        f"IF-style cascade ({res['family']} U-Nets, blocks {res['blocks']}, random weights): stage I {res['low']}px, "
        f"stage II {res['low']}->{res['high']}px (noise level {LEVEL}), DDPM learned_range + dynamic thresholding, "
        f"steps {res['steps']}, CFG {res['guidance']}, batch {res['batch']}, {res['rounds']} interleaved rounds after "
        f"one warm-up call each (spread: (max - min) / median); {m['cpu']}, affinity {m['affinity']}, torch "
        f"{res['torch']} with {res['torch_threads']} thread(s); 1-minute load average before "
        f"{load['load_before'][0]:.2f}, max during {load['load_max_1min']:.2f}, after {load['load_after'][0]:.2f} "
        f"(other processes' runnable threads: mean {load['others_runnable_mean']:.1f}, max "
        f"{load['others_runnable_max']}).",
        "",
        "| framework | images/s (spread) | s per batch | first call s |",
        "|---|---|---|---|",
        f"| jaxdiff (one program) | {res['jaxdiff_images_per_s']:.3f} ({js['rel_spread']:.0%}) | {js['median']:.3f} "
        f"| {res['jaxdiff_first_call_s']:.2f} (compile {res['jaxdiff_compile_s']:.2f}) |",
        f"| diffusers (two pipelines) | {res['diffusers_images_per_s']:.3f} ({ts['rel_spread']:.0%}) "
        f"| {ts['median']:.3f} | {res['diffusers_first_call_s']:.2f} |",
        "",
        *targets_table(checked),
        "",
        f"max |jaxdiff - diffusers| over the final images: {res['max_abs_diff']:.2e} (tolerance {TOLERANCE:g}); "
        f"new compilations after the first call: {res['jaxdiff_new_compiles_after_first']}",
    ]) + "\n"


def _pair(text: str, kind: type) -> tuple:
    vals = tuple(kind(v) for v in text.split(","))
    return vals * 2 if len(vals) == 1 else vals


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="the Markdown report (default: the JSON path with .md)")
    p.add_argument("--family", default="if", choices=("if", "sd"),
                   help="U-Net blocks: IF's (SimpleCrossAttn, text addition embedding) or plain cross-attention")
    p.add_argument("--blocks", default="64,128", help="U-Net block widths; default 64,128")
    p.add_argument("--low", type=int, default=16, help="stage I size; default 16")
    p.add_argument("--high", type=int, default=32, help="stage II size; default 32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", default="10,5", help="steps per stage; default 10,5")
    p.add_argument("--guidance", default="7,4", help="guidance per stage; default 7,4")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pair = Pair(Path(tmp), family=a.family, low=a.low, high=a.high, blocks=_pair(a.blocks, int),
                        batch=a.batch, steps=_pair(a.steps, int), guidance=_pair(a.guidance, float))
            with LoadMonitor() as load:
                measured = measure(pair, a.rounds)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    res: dict[str, Any] = {
        "family": a.family, "blocks": list(_pair(a.blocks, int)), "low": a.low, "high": a.high, "batch": a.batch,
        "steps": list(_pair(a.steps, int)), "guidance": list(_pair(a.guidance, float)), "noise_level": LEVEL,
        "rounds": a.rounds, "target": TARGET, "tolerance": TOLERANCE,
        "machine": {**machine(), "platform": platform.platform(), "python": platform.python_version()},
        "torch": torch.__version__, "torch_threads": used, "jaxdiff_load_s": pair.jaxdiff_load_s,
        **measured, "load": load.summary(), "seconds": round(time.perf_counter() - started, 1),
    }
    res["targets"] = check_targets(res, {"cascade_throughput_ratio": (">=", TARGET)})
    import json

    text = json.dumps(res, indent=2)
    print(text)
    md = table(res)
    print(md)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    path = markdown_path(a.json, a.md)
    if path:
        path.write_text(md)
    return res


if __name__ == "__main__":
    main()
