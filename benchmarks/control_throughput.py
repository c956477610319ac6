"""ControlNet text-to-image throughput: jaxdiff vs diffusers (PyTorch) on the same weights (issue 12).

One random SD-architecture folder (``benchmarks/throughput.py`` ``SIZES``, built and saved by diffusers as
``benchmarks/sampler_throughput.py`` does) plus a ControlNet of the same size
(``diffusers.ControlNetModel.from_unet``, its zero-initialised convolutions drawn at random so that the
control changes the image), one control image (Canny edges of scikit-image's ``astronaut`` at the output
size, by :func:`jaxdiff.control_images.canny`). Both frameworks sample DPM-Solver++ 2M, 20 steps, CFG 7.5,
4 prompts, from the same start latents (diffusers' ``latents=``):

- jaxdiff: ``sd(prompts, network_transform=controlnet_transform(sd, net, image, ...), sampler="dpmpp_2m")``
  with its defaults (on CPU the batch split over one CPU device per core);
- diffusers: ``StableDiffusionControlNetPipeline`` with ``DPMSolverMultistepScheduler``, PyTorch's threads.

Both run in this process, one warm-up (compile) call each, then ``--rounds`` interleaved timed calls
(jaxdiff, diffusers, jaxdiff, ...), each a whole pipeline call (text encoding, control image preparation,
sampling, decoding) with new start latents. Reported: images/s (median over rounds) with the spread,
``controlnet_throughput_ratio`` (jaxdiff images/s over diffusers', target >= 1.25 at the mid size, batch 4),
jaxdiff's compile time (first call minus the median call), the largest pixel difference between the two
frameworks' images (float32: at most 1e-3) and how much the control moves the image (jaxdiff at
conditioning scale 1 vs 0). The 1-minute load average is recorded as in ``sampler_throughput.py``; when it
exceeded the core count the ratio is not reported (null, with the reason).

    python benchmarks/control_throughput.py --json benchmarks/results/control_throughput.json \
        --md benchmarks/results/control_throughput.md
    python benchmarks/control_throughput.py --size tiny --steps 2 --batch 1 --rounds 1   # a quick check
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import throughput  # noqa: E402
from benchmarks._common import LoadMonitor, load_refusal, machine, parser, spread  # noqa: E402
from benchmarks.sampler_throughput import build_folder  # noqa: E402

PROMPTS = ("a photograph of an astronaut riding a horse", "a red car on a hill at sunset",
           "a watercolour painting of a lighthouse", "a bowl of fruit on a wooden table")
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
TOLERANCE = 1e-3  # float32, both frameworks on the same weights and latents
TARGET = 1.25  # issue 12: controlnet_throughput_ratio at the mid size, batch 4


def build_controlnet(sd_folder: Path, root: Path, seed: int = 1) -> Path:
    """``ControlNetModel.from_unet`` of the folder's U-Net (as many control downsamplings as the VAE has), its
    zero convolutions drawn from N(0, 1 / fan_in) so the control matters; saved as safetensors."""
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd_folder / "unet"))
    vae_blocks = len(json.loads((sd_folder / "vae" / "config.json").read_text())["block_out_channels"])
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:vae_blocks])
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(ZERO_INIT):
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.normal_(0.0, fan_in ** -0.5)
    folder = root / (sd_folder.name + "-controlnet")
    cn.save_pretrained(str(folder), safe_serialization=True)
    return folder


def edge_image(height: int, width: int) -> np.ndarray:
    """Canny edges of scikit-image's ``astronaut`` resized to ``height`` x ``width``: (1, H, W, 3) float32 in [0, 1]."""
    import skimage.data
    from PIL import Image

    from jaxdiff.control_images import canny, control_image

    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.LANCZOS))
    return np.asarray(control_image(canny(photo.mean(-1) / 255.0, sigma=1.0)), np.float32)


def _nchw(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


class Pair:
    """The two pipelines on the same folders; ``jaxdiff(noise)`` / ``diffusers(noise)`` -> (seconds, images)."""

    def __init__(self, sd_folder: Path, cn_folder: Path, batch: int, steps: int, guidance: float) -> None:
        import diffusers
        import torch

        from jaxdiff.models._pure import PureModel
        from jaxdiff.pipelines import StableDiffusion
        from jaxdiff.pipelines.controlnet import load_controlnet

        t0 = time.perf_counter()
        self.sd = StableDiffusion.from_pretrained(sd_folder)
        self.net = PureModel.of(load_controlnet(cn_folder))
        self.jaxdiff_load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cn = diffusers.ControlNetModel.from_pretrained(str(cn_folder)).to(torch.float32).eval()
        self.pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            str(sd_folder), controlnet=cn, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.diffusers_load_s = time.perf_counter() - t0
        self.size = self.sd.default_size
        self.image = edge_image(self.size, self.size)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        self.steps, self.guidance = steps, guidance

    def noise(self, seed0: int) -> np.ndarray:
        """Standard-normal start latents (B, h, w, c), one seed per image."""
        n = len(self.prompts)
        return self.sd.initial_noise([seed0 + i for i in range(n)], n, self.size, self.size)

    def jaxdiff(self, noise: np.ndarray, scale: float = 1.0) -> tuple[float, np.ndarray]:
        from jaxdiff.pipelines.controlnet import controlnet_transform

        t0 = time.perf_counter()
        cn = controlnet_transform(self.sd, self.net, self.image, height=self.size, width=self.size, scale=scale)
        out = self.sd(self.prompts, negative=[""] * len(self.prompts), network_transform=cn, steps=self.steps,
                      sampler="dpmpp_2m", guidance=self.guidance, height=self.size, width=self.size, latents=noise)
        return time.perf_counter() - t0, out  # host arrays: finished

    def diffusers(self, noise: np.ndarray) -> tuple[float, np.ndarray]:
        import torch

        latents = _nchw(noise)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(prompt=self.prompts, negative_prompt=[""] * len(self.prompts), image=self.image,
                            num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.size,
                            width=self.size, latents=latents, output_type="np").images
        return time.perf_counter() - t0, np.asarray(out)


def measure(pair: Pair, rounds: int) -> dict[str, Any]:
    """Warm-up call of each, then ``rounds`` interleaved timed calls (new latents each round)."""
    from jaxdiff import parallel

    noise = pair.noise(0)
    jax_first, jax_img = pair.jaxdiff(noise)
    torch_first, torch_img = pair.diffusers(noise)
    diffs = [float(np.abs(jax_img - torch_img).max())]
    jax_runs, torch_runs = [], []
    for r in range(rounds):
        noise = pair.noise(1000 * (r + 1))
        t, jax_img = pair.jaxdiff(noise)
        jax_runs.append(t)
        t, torch_img = pair.diffusers(noise)
        torch_runs.append(t)
        print(f"round {r + 1}: jaxdiff {jax_runs[-1]:.3f} s, diffusers {torch_runs[-1]:.3f} s", flush=True)
    diffs.append(float(np.abs(jax_img - torch_img).max()))
    plain_s, plain = pair.jaxdiff(noise, scale=0.0)  # the same call without control (scale is traced: no recompile)
    batch = len(pair.prompts)
    js, ts = spread(jax_runs), spread(torch_runs)
    mesh = parallel.sampling_mesh(batch)
    return {
        "jaxdiff_images_per_s": batch / js["median"], "diffusers_images_per_s": batch / ts["median"],
        "controlnet_throughput_ratio": ts["median"] / js["median"],
        "jaxdiff_seconds_per_batch": js, "diffusers_seconds_per_batch": ts,
        "jaxdiff_first_call_s": jax_first, "jaxdiff_compile_s": max(jax_first - js["median"], 0.0),
        "diffusers_first_call_s": torch_first,
        "jaxdiff_devices": 1 if mesh is None else int(mesh.size),
        "jaxdiff_mesh": None if mesh is None else dict(mesh.shape),
        "max_abs_diff": max(diffs), "max_abs_diff_per_check": diffs, "images_agree": max(diffs) <= TOLERANCE,
        "image_std": float(torch_img.std()), "control_effect_max_abs": float(np.abs(jax_img - plain).max()),
        "jaxdiff_scale0_call_s": plain_s,
        "raw_s": {"jaxdiff": jax_runs, "diffusers": torch_runs},
    }


def table(res: dict[str, Any]) -> str:
    """The Markdown report."""
    m, load = res["machine"], res["load"]
    ratio = res["controlnet_throughput_ratio"]
    shown = "refused (load)" if ratio is None else f"{ratio:.2f}"
    js, ts = res["jaxdiff_seconds_per_batch"], res["diffusers_seconds_per_batch"]
    lines = [
        f"ControlNet text-to-image ({res['size']} SD architecture + a ControlNet of the same size, random weights, "
        f"{res['height']}x{res['width']}), DPM-Solver++ 2M, {res['steps']} steps, CFG {res['guidance']}, batch "
        f"{res['batch']}, {res['rounds']} interleaved rounds after one warm-up call each (spread: (max - min) / "
        f"median); {m['cpu']}, {load['cores']} cores ({m['platform']}), torch {res['torch']} with "
        f"{res['torch_threads']} threads, jaxdiff on {res['jaxdiff_devices']} CPU device(s); load average before "
        f"{load['load_before'][0]:.2f}, max during {load['load_max_1min']:.2f}, after {load['load_after'][0]:.2f}.",
        "",
        "| framework | images/s (spread) | s per batch | first call s |",
        "|---|---|---|---|",
        f"| jaxdiff | {res['jaxdiff_images_per_s']:.3f} ({js['rel_spread']:.0%}) | {js['median']:.3f} "
        f"| {res['jaxdiff_first_call_s']:.2f} (compile {res['jaxdiff_compile_s']:.2f}) |",
        f"| diffusers | {res['diffusers_images_per_s']:.3f} ({ts['rel_spread']:.0%}) | {ts['median']:.3f} "
        f"| {res['diffusers_first_call_s']:.2f} |",
        "",
        f"controlnet_throughput_ratio: {shown} (target >= {TARGET})",
        f"max |jaxdiff - diffusers| over the pixels: {res['max_abs_diff']:.2e} (tolerance {TOLERANCE:g}); "
        f"the control moves pixels by up to {res['control_effect_max_abs']:.3f}",
    ]
    if res.get("refused"):
        lines += ["", f"Ratio refused: {res['refused']}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="write the Markdown table to this path")
    p.add_argument("--size", default="mid", choices=sorted(throughput.SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed calls of each framework")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for diffusers (default: PyTorch's own choice, the physical cores)")
    p.add_argument("--max-load", type=float, default=None,
                   help="refuse the ratio when the 1-minute load average exceeds this; default the core count")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.batch < 1 or a.steps < 1:
        p.error("--rounds, --batch and --steps must be at least 1")
    import torch

    threads = torch.get_num_threads()
    try:
        if a.torch_threads is not None:
            torch.set_num_threads(a.torch_threads)
        used = torch.get_num_threads()
        with tempfile.TemporaryDirectory() as tmp:
            sd_folder = build_folder(a.size, Path(tmp))
            pair = Pair(sd_folder, build_controlnet(sd_folder, Path(tmp)), a.batch, a.steps, a.guidance)
            with LoadMonitor(max_load=a.max_load) as load:
                measured = measure(pair, a.rounds)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the smoke test)
    res: dict[str, Any] = {
        "size": a.size, "batch": a.batch, "steps": a.steps, "guidance": a.guidance, "sampler": "dpmpp_2m",
        "rounds": a.rounds, "height": pair.size, "width": pair.size, "target": TARGET, "tolerance": TOLERANCE,
        "machine": {**machine(), "platform": platform.platform(), "python": platform.python_version()},
        "torch": torch.__version__, "torch_threads": used, "torch_threads_set": a.torch_threads,
        "jaxdiff_load_s": pair.jaxdiff_load_s, "diffusers_load_s": pair.diffusers_load_s,
        **measured, "load": load.summary(),
    }
    if not res["load"]["quiet"]:
        res["refused"] = load_refusal(res["load"], "ratio")
        print("ratio not reported: " + res["refused"], file=sys.stderr)
        res["ratio_measured_under_load"], res["controlnet_throughput_ratio"] = res["controlnet_throughput_ratio"], None
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    md = table(res)
    print(md)
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(md)
    return res


if __name__ == "__main__":
    main()
