"""The ``jaxdiff`` command line: ``sample``, ``info``, ``bench``.

``jaxdiff sample`` dispatches on ``--model``: a diffusers Stable Diffusion folder (text-to-image,
``--init-image`` image-to-image, ``--mask`` inpainting), ``mixture2d`` (a scatter plot of the built-in
2-D Gaussian mixture) or a model of :mod:`jaxdiff.builtin` (a PNG grid). Every PNG carries the settings
that made it in its text chunks; ``jaxdiff sample --from-png FILE`` makes the same image again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

MIXTURE = "mixture2d"
SD_DEFAULTS = dict(steps=30, guidance=7.5, schedule=None, sampler=None)
MIXTURE_DEFAULTS = dict(steps=30, guidance=1.0, schedule="karras", sampler="euler")


class CLIError(ValueError):
    """A user error: printed as one line, exit status 2."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxdiff")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


def builtin_models() -> dict[str, str]:
    """Built-in model names -> descriptions (``mixture2d`` plus :mod:`jaxdiff.builtin`'s when it imports)."""
    models = {MIXTURE: "2-D Gaussian mixture on a ring (exact denoiser; a scatter plot)"}
    try:
        from jaxdiff import builtin
    except ImportError:
        return models
    return {**models, **dict(builtin.BUILTIN_MODELS)}


def default_model() -> str:
    """``digits`` (the built-in class-conditional model) when :mod:`jaxdiff.builtin` imports, else ``mixture2d``."""
    return "digits" if "digits" in builtin_models() else MIXTURE


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(builtin_models())
    p.add_argument("--model", default=default_model(),
                   help=f"a diffusers Stable Diffusion folder, an original SD 1.x/2.x single .safetensors file, "
                        f"or a built-in model ({names})")
    p.add_argument("--config", default=None,
                   help="for a single .safetensors file: the model's diffusers folder, or a JSON file with any of "
                        "unet, vae, text_encoder, scheduler, prediction_type, image_size (default: inferred)")
    p.add_argument("--prompt", action="append", default=None, help="text prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative", default=None, help="negative prompt (for every image)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the folder's scheduler's equivalent)")
    p.add_argument("--schedule", default=None, help="schedule name (default: the folder's scheduler's timesteps)")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5 for SD)")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--init-image", default=None, help="image-to-image: the starting picture")
    p.add_argument("--strength", type=float, default=None, help="image-to-image strength in (0, 1] (default 0.8)")
    p.add_argument("--mask", default=None, help="inpainting mask image (white = repaint), with --init-image")
    p.add_argument("--clip-skip", type=int, default=None, help="use the text encoder's hidden state k layers earlier")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="network dtype")
    p.add_argument("--num", type=int, default=None, help="number of samples (built-in models)")
    p.add_argument("--label", type=int, default=None, help="class label (built-in models)")
    p.add_argument("--out", default="samples.png", help="output PNG (a grid; single images beside it)")
    p.add_argument("--from-png", default=None, help="reproduce the image(s) from a PNG written by jaxdiff")
    p.add_argument("--compile-cache", default=None, help="persistent compilation cache folder ($JAXDIFF_COMPILE_CACHE)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# ---- mixture2d (scatter plot) -------------------------------------------------------------------

def _sample_mixture(args: argparse.Namespace) -> Path:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import guidance, mixtures, sampling, schedules
    from jaxdiff.plotting import scatter_png
    from jaxdiff.samplers import get_sampler

    num = args.num or 2000
    mix = mixtures.ring_2d()
    sampler = get_sampler(args.sampler)
    make = schedules.get_schedule(args.schedule)
    if args.steps <= 0:
        raise CLIError(f"--steps must be positive, got {args.steps}")
    cap = max(args.steps, 1000)
    sigmas = make(args.steps, 0.01, 40.0, capacity=cap) if args.schedule in (
        "karras", "exponential", "linear", "ncsn_geometric") else make(args.steps, capacity=cap)
    key = jax.random.key(args.seed)
    x = sampling.initial_noise(jax.random.fold_in(key, 1), (num, 2), sigmas.values[0], sigma_data=4.0)
    denoiser, cond = mix, None
    if args.label is not None:
        if not 0 <= args.label < mix.num_classes:
            raise CLIError(f"--label must be in [0, {mix.num_classes}), got {args.label}")
        cond = jnp.full((num,), args.label, jnp.int32)
        denoiser = guidance.classifier_free(args.guidance, jnp.full((num,), mixtures.UNCONDITIONAL))(mix)
    t0 = time.perf_counter()
    out = np.asarray(sampling.sample(denoiser, sampler, sigmas, x, key, cond, progress=not args.no_progress))
    dt = time.perf_counter() - t0
    ref = np.asarray(mix.sample(jax.random.fold_in(key, 2), num,
                                None if args.label is None else np.full((num,), args.label)))
    title = f"{args.sampler}, {args.schedule}, {args.steps} steps"
    title += "" if args.label is None else f", class {args.label}"
    path = scatter_png(out, ref, args.out, title)
    print(json.dumps({"out": str(path), "model": args.model, "sampler": args.sampler, "steps": args.steps,
                      "seed": args.seed, "seconds": round(dt, 3)}))
    return path


# ---- built-in models (jaxdiff.builtin) ----------------------------------------------------------

def _sample_builtin(args: argparse.Namespace) -> Path:
    import numpy as np

    from jaxdiff import builtin
    from jaxdiff.images import grid, save_png

    options = {k: getattr(args, k) for k in ("sampler", "schedule", "steps", "guidance", "label")
               if getattr(args, k) is not None}
    settings = dict(model=args.model, num=args.num or 100, seed=args.seed, jaxdiff_version=_version(), **options)
    t0 = time.perf_counter()
    images = builtin.sample_builtin(args.model, num=settings["num"], seed=args.seed, progress=not args.no_progress,
                                    **options)
    dt = time.perf_counter() - t0
    images = np.asarray(images)
    zoom = max(1, 32 // images.shape[1])  # 8x8 digits: nearest-neighbour 4x so the grid is readable
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    cols = 10 if args.label is None and len(images) >= 10 else None  # label=None cycles 0..9: a column per class
    path = save_png(grid(images, cols=cols, pad=zoom), args.out, settings)
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3)}))
    return path


# ---- Stable Diffusion folders -------------------------------------------------------------------

def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CLIError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CLIError("give a prompt with --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.batch < 1:
        raise CLIError(f"--batch must be at least 1, got {args.batch}")
    return [p for p in prompts for _ in range(args.batch)]


def _dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _sd_inputs(args: argparse.Namespace, n: int, sd: Any) -> dict:
    from jaxdiff.images import load_image

    kw: dict[str, Any] = {}
    if args.init_image:
        if not Path(args.init_image).is_file():
            raise CLIError(f"--init-image {args.init_image} does not exist")
        size = None if args.height is None or args.width is None else (args.height, args.width)
        kw["image"] = load_image(args.init_image, size)
        kw["strength"] = args.strength
    elif args.strength is not None:
        raise CLIError("--strength needs --init-image")
    if args.mask:
        if not args.init_image:
            raise CLIError("--mask needs --init-image (the picture to inpaint)")
        if not Path(args.mask).is_file():
            raise CLIError(f"--mask {args.mask} does not exist")
        kw["mask"] = load_image(args.mask, grayscale=True)
    return kw


def _sample_sd(args: argparse.Namespace) -> Path:
    import jax
    import numpy as np

    from jaxdiff import parallel
    from jaxdiff.images import grid, save_png
    from jaxdiff.pipelines import StableDiffusion

    prompts = _prompts(args)
    n = len(prompts)
    config = dict(config=args.config) if getattr(args, "config", None) else {}
    sd = StableDiffusion.from_pretrained(args.model, dtype=_dtype(args.dtype), clip_skip=args.clip_skip, **config)
    seeds = [args.seed + i for i in range(n)]
    plan = sd.plan(args.steps, args.sampler, args.schedule)  # warns once when the folder's scheduler has no equivalent
    kw = dict(negative=args.negative, steps=args.steps, sampler=plan.sampler_name, schedule=args.schedule,
              guidance=args.guidance, rescale=args.rescale, seed=seeds, height=args.height, width=args.width,
              **_sd_inputs(args, n, sd))
    t0 = time.perf_counter()
    if jax.device_count() > 1:
        images = parallel.generate(sd, prompts, **kw)
    else:
        images = sd(prompts, progress=not args.no_progress, **kw)
    dt = time.perf_counter() - t0
    base = dict(model=str(Path(args.model).resolve()), negative=args.negative or "", sampler=plan.sampler_name,
                schedule=plan.schedule_name, steps=args.steps, guidance=args.guidance, rescale=args.rescale,
                height=int(images.shape[1]), width=int(images.shape[2]), dtype=args.dtype, clip_skip=args.clip_skip,
                init_image=args.init_image, strength=args.strength, mask=args.mask, jaxdiff_version=_version())
    out = Path(args.out)
    paths = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        single = out if n == 1 else out.with_name(f"{out.stem}-{i:03d}{out.suffix or '.png'}")
        paths.append(save_png(images[i], single, dict(base, prompt=[p], seed=[s])))
    if n > 1:
        save_png(grid(images), out, dict(base, prompt=prompts, seed=seeds))
    print(json.dumps({"out": str(out), "images": [str(p) for p in paths], "seconds": round(dt, 3),
                      "sampler": plan.sampler_name, "steps": args.steps, "seed": args.seed}))
    return out


def _apply_png_settings(args: argparse.Namespace) -> None:
    """Fill ``args`` from a jaxdiff PNG's settings (explicit --out is kept)."""
    from jaxdiff.images import read_settings

    s = read_settings(args.from_png)
    args.model = s["model"]
    if args.model in builtin_models():
        for k in ("sampler", "schedule", "steps", "guidance", "label", "num", "seed"):
            setattr(args, k, s.get(k))
        return
    prompts, seeds = s["prompt"], s["seed"]
    if seeds != [seeds[0] + i for i in range(len(seeds))]:
        raise CLIError(f"{args.from_png}: seeds {seeds} are not consecutive; reproduce with the pipeline API")
    args.prompt, args.prompts_file, args.batch, args.seed = prompts, None, 1, seeds[0]
    for k in ("negative", "sampler", "schedule", "steps", "guidance", "rescale", "height", "width", "dtype",
              "clip_skip", "init_image", "strength", "mask"):
        setattr(args, k, s.get(k))
    args.negative = args.negative or None


def cmd_sample(args: argparse.Namespace) -> int:
    from jaxdiff import compile_cache

    if args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:
        compile_cache.from_env()
    if args.from_png:
        _apply_png_settings(args)
    names = builtin_models()
    defaults = MIXTURE_DEFAULTS if args.model == MIXTURE else SD_DEFAULTS if args.model not in names else {}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model == MIXTURE:
        _sample_mixture(args)
    elif args.model in names:
        _sample_builtin(args)
    elif Path(args.model).exists():
        _sample_sd(args)
    else:
        raise CLIError(f"unknown model {args.model!r}: not a folder or .safetensors file, and not a built-in model "
                       f"(built-in: {', '.join(names)})")
    return 0


# ---- info ---------------------------------------------------------------------------------------

def folder_summary(path: str | Path) -> dict:
    """Components, classes, parameter counts and scheduler settings of a diffusers folder (no weights loaded)."""
    import numpy as np

    from jaxdiff.convert import (find_weights, missing_components, open_safetensors, read_component_config,
                                 read_model_index)
    from jaxdiff.convert.folders import component_kind

    pf = read_model_index(path)
    out: dict[str, Any] = {"path": str(pf.root), "pipeline": pf.class_name, "components": {}}
    for name, (lib, cls) in pf.components.items():
        if cls is None:
            continue
        entry: dict[str, Any] = {"class": cls, "library": lib}
        if component_kind(cls) == "model":
            try:
                with open_safetensors(find_weights(pf.root / name)) as t:
                    entry["parameters"] = int(sum(int(np.prod(t.shapes[k])) for k in t.keys()))
            except (FileNotFoundError, ValueError) as e:
                entry["error"] = str(e)
        if component_kind(cls) == "scheduler":
            cfg = read_component_config(pf.root, name)
            entry.update({k: cfg.get(k) for k in ("prediction_type", "beta_schedule", "timestep_spacing",
                                                  "steps_offset") if k in cfg})
        out["components"][name] = entry
    missing = missing_components(pf.root)
    if missing:
        out["missing"] = missing
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import jax

    from jaxdiff.samplers import SAMPLERS
    from jaxdiff.schedules import SCHEDULES

    info: dict[str, Any] = {
        "jaxdiff": _version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "samplers": sorted(SAMPLERS),
        "schedules": sorted(SCHEDULES),
        "models": list(builtin_models()),
    }
    if args.model:
        if not Path(args.model).exists():
            raise CLIError(f"model folder {args.model} does not exist")
        info["model"] = folder_summary(args.model)
    print(json.dumps(info, indent=2))
    return 0


# ---- bench --------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from jaxdiff import compile_cache
    from jaxdiff.pipelines import throughput

    if args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:
        compile_cache.from_env()
    result = throughput.run(args.size, args.model, batch=args.batch, steps=args.steps, guidance=args.guidance,
                            sampler=args.sampler, repeats=args.repeats)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Diffusion sampling in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="draw samples and write PNGs")
    _add_sample_args(p)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("info", help="devices, samplers, schedules, models; --model FOLDER summarises a folder")
    p.add_argument("--model", default=None, help="a diffusers folder to summarise")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="images/s of Stable Diffusion sampling (random SD-architecture weights)")
    p.add_argument("--size", default="tiny", help="random model size: tiny or mid (ignored with --model)")
    p.add_argument("--model", default=None, help="a diffusers folder instead of random weights")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--compile-cache", default=None, help="persistent compilation cache folder")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad names, options, paths: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
