"""The ``jaxdiff`` command line: ``sample``, ``info``, ``bench``.

``jaxdiff sample`` dispatches on ``--model``: a diffusers Stable Diffusion folder or the built-in one,
``digits-sd`` (text-to-image, ``--init-image`` image-to-image, ``--mask`` inpainting), ``mixture2d`` (a
scatter plot of the built-in 2-D Gaussian mixture) or a pixel model of :mod:`jaxdiff.builtin` (a PNG grid). Every PNG carries the settings
that made it in its text chunks; ``jaxdiff sample --from-png FILE`` makes the same image again.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

MIXTURE = "mixture2d"
SEED_LIMIT = 2**32  # seeds are uint32: image i of a run uses seed + i
MAX_STEPS = 1000  # jaxdiff.schedules.DEFAULT_CAPACITY: the compiled loop's capacity for SD and built-in models
MIXTURE_SCHEDULES = ("karras", "exponential", "linear", "ncsn_geometric")
# Defaults of each model kind; the CLI fills them in and passes them on, so the PNG records what ran.
SD_DEFAULTS = dict(steps=30, guidance=7.5, rescale=0.0, batch=1, dtype="float32")
MIXTURE_DEFAULTS = dict(steps=30, guidance=1.0, schedule="karras", sampler="euler", num=2000)
BUILTIN_DEFAULTS = dict(steps=20, guidance=3.0, classifier_scale=0.0, schedule="karras", sampler="dpmpp_2m", num=100)
CONTROL_OPTIONS = ("control", "controlnet", "control_scale", "control_start", "control_end", "guess_mode", "adapter",
                   "adapter_scale", "control_preprocess")  # SD: ControlNet / T2I-Adapter (recorded in the PNG)
PERSONAL_OPTIONS = ("lora", "embedding", "hypernetwork")  # SD: LoRA, textual inversion, hypernetworks (recorded)
PREPROCESS = ("none", "canny")
COMMON = ("model", "sampler", "schedule", "steps", "seed", "out", "from_png", "compile_cache", "no_progress")
APPLIES = {  # options (beyond COMMON) that mean something for each model kind
    "sd": ("prompt", "prompts_file", "negative", "guidance", "rescale", "batch", "height", "width", "init_image",
           "strength", "mask", "depth_map", "clip_skip", "dtype", "config", "cpu_devices", *CONTROL_OPTIONS,
           *PERSONAL_OPTIONS),
    "mixture": ("num", "label", "guidance"),
    "builtin": ("num", "label", "guidance", "classifier_scale", "cpu_devices"),
    "palette": ("init_image", "mask", "task", "num"),  # image-to-image built-ins (digits-palette)
    "dit": ("num", "label", "guidance"),  # class-conditional DiT built-ins (digits-dit)
    "video": ("num", "label", "guidance", "frames"),  # video built-ins (digits-video): an animated GIF
}
PALETTE_DEFAULTS = dict(steps=20, schedule="karras", sampler="dpmpp_2m", num=1, task="restore")
UNCONDITIONAL_BUILTINS = ("digits-ncsn",)  # no label, no guidance


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


def sampleable_models() -> list[str]:
    """Every built-in name ``jaxdiff sample --model`` takes: class-conditional, SD folders, Palette, DiT, video,
    cascades and unCLIP."""
    return [*builtin_models(), *builtin_pipelines(), *_palette_models(), *_dit_models(), *_video_models(),
            *_cascade_models(), *_unclip_models()]


def _builtin_table(table: str) -> dict[str, str]:
    """One of :mod:`jaxdiff.builtin`'s name -> description tables (``BUILTIN_PIPELINES``, ...); empty when the module
    does not import or lacks it."""
    try:
        from jaxdiff import builtin
    except ImportError:
        return {}
    return dict(getattr(builtin, table, {}))


def builtin_pipelines() -> dict[str, str]:
    """Built-in Stable Diffusion folders (``digits-sd``): name -> description; they sample as any SD folder."""
    return _builtin_table("BUILTIN_PIPELINES")


def model_path(model: str) -> Path:
    """The folder or file of a folder ``--model``: a built-in pipeline's, cascade's or unCLIP model's shipped folder,
    else the path given."""
    for names, folder in ((_cascade_models, "cascade_folder"), (_unclip_models, "unclip_folder"),
                          (builtin_pipelines, "builtin_folder")):
        if model in names():  # the names come from jaxdiff.builtin, so it imports
            from jaxdiff import builtin

            return getattr(builtin, folder)(model)
    return Path(model)


def _cascade_models() -> dict[str, str]:
    """The built-in cascades (digits-cascade) and what each is."""
    return _builtin_table("BUILTIN_CASCADES")


def _unclip_models() -> dict[str, str]:
    """The built-in unCLIP models (digits-unclip) and what each is."""
    return _builtin_table("BUILTIN_UNCLIP")


def default_model() -> str:
    """``digits`` (the built-in class-conditional model) when :mod:`jaxdiff.builtin` imports, else ``mixture2d``."""
    return "digits" if "digits" in builtin_models() else MIXTURE


def model_kind(model: str) -> str:
    """``"mixture"``, ``"builtin"`` or ``"sd"`` (a built-in pipeline or an existing path); a clear error otherwise."""
    names = builtin_models()
    if model == MIXTURE:
        return "mixture"
    if model in _palette_models():
        return "palette"
    if model in _dit_models():
        return "dit"
    if model in _video_models():
        return "video"
    if model in names:
        return "builtin"
    if _is_cascade(model):
        return "cascade"
    if model in builtin_pipelines() or Path(model).exists():
        return "sd"
    raise CLIError(f"unknown model {model!r}: not a folder, and not a built-in model "
                   f"(built-in: {', '.join(sampleable_models())})")


def schedule_names(model: str) -> tuple[str, ...]:
    """The names ``--schedule`` accepts for ``model`` (a built-in name or a Stable Diffusion folder)."""
    kind = model_kind(model)
    if kind in ("mixture", "palette", "video"):
        return MIXTURE_SCHEDULES if kind == "mixture" else MIXTURE_SCHEDULES[:3]
    if kind == "dit":
        return schedule_names_sd()
    if kind == "builtin":
        from jaxdiff import builtin

        vp = builtin.builtin_config(model)["adapter"]["kind"] == "discrete_vp"
        return tuple(s for s in builtin.SCHEDULE_NAMES if vp or s != "vp_discrete")
    return schedule_names_sd()


def schedule_names_sd() -> tuple[str, ...]:
    """The names ``--schedule`` accepts for Stable Diffusion folders (``default``: the folder's scheduler's)."""
    from jaxdiff.pipelines.schedulers import SCHEDULE_NAMES

    return tuple(SCHEDULE_NAMES)


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(sampleable_models())
    sd, mx, bi = SD_DEFAULTS, MIXTURE_DEFAULTS, BUILTIN_DEFAULTS
    p.add_argument("--model", default=None,
                   help=f"a diffusers Stable Diffusion folder, an original SD 1.x/2.x single .safetensors file, "
                        f"or a built-in model ({names}); default {default_model()}")
    p.add_argument("--config", default=None,
                   help="for a single .safetensors file: the model's diffusers folder, or a JSON file with any of "
                        "unet, vae, text_encoder, scheduler, prediction_type, image_size; default: inferred")
    p.add_argument("--prompt", action="append", default=None, help="SD: text prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="SD: a text file with one prompt per line")
    p.add_argument("--negative", default=None, help="SD: negative prompt for every image (default: none)")
    p.add_argument("--sampler", default=None,
                   help=f"sampler name (see `jaxdiff info`); default: SD the folder's scheduler's equivalent "
                        f"(PNDM, LMS: dpmpp_2m), {MIXTURE} {mx['sampler']}, built-in {bi['sampler']}")
    p.add_argument("--schedule", default=None,
                   help=f"noise schedule (`jaxdiff info` lists the names each model accepts); default: SD 'default' "
                        f"(the folder's scheduler's timesteps), {MIXTURE} {mx['schedule']}, built-in {bi['schedule']} "
                        "(ncsn_geometric with --sampler langevin)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps, at most {MAX_STEPS}; default: SD {sd['steps']}, {MIXTURE} {mx['steps']}, "
                        f"built-in {bi['steps']} (with langevin, the model's trained level count)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale; default: SD {sd['guidance']}, digits {bi['guidance']}, "
                        f"{MIXTURE} {mx['guidance']} (with --label only); not for digits-ncsn")
    p.add_argument("--classifier-scale", type=float, default=None,
                   help="digits: classifier guidance scale with the built-in noisy classifier digits-classifier "
                        "(Dhariwal & Nichol 2021), steering the unconditional model to --label; replaces --guidance; "
                        f"default {bi['classifier_scale']:g} (off)")
    p.add_argument("--rescale", type=float, default=None,
                   help=f"SD: guidance rescale phi (Lin et al. 2024); default {sd['rescale']:g}")
    p.add_argument("--seed", type=int, default=0, help="seed in [0, 2^32) of the first image; image i uses seed + i; "
                                                       "default 0")
    p.add_argument("--batch", type=int, default=None, help=f"SD: images per prompt; default {sd['batch']}")
    p.add_argument("--height", type=int, default=None,
                   help="SD: image height in pixels; default the init image's, else the model's sample size")
    p.add_argument("--width", type=int, default=None,
                   help="SD: image width in pixels; default the init image's, else the model's sample size")
    p.add_argument("--init-image", default=None, help="SD image-to-image: the starting picture")
    p.add_argument("--strength", type=float, default=None,
                   help="SD image-to-image strength in (0, 1]; default 0.8 (1.0 with --mask)")
    p.add_argument("--mask", default=None,
                   help="SD inpainting: mask image the size of --init-image (white = repaint), with --init-image")
    p.add_argument("--depth-map", default=None, metavar="IMAGE",
                   help="SD 2 depth models (depth-to-image, with --init-image): a depth image (gray or RGB, 8 or 16 "
                        "bit; larger = nearer); default: the model's DPT estimates it from the init image")
    _add_control_args(p)
    _add_personal_args(p)
    _add_unclip_args(p)
    p.add_argument("--clip-skip", type=int, default=None,
                   help="SD: use the text encoder's hidden state k layers earlier; default 0")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help=f"SD: network dtype; default {sd['dtype']} (float16 needs a GPU)")
    p.add_argument("--num", type=int, default=None,
                   help=f"built-in models: number of samples; default {bi['num']} (digits), {mx['num']} ({MIXTURE})")
    p.add_argument("--task", default=None, choices=("inpaint", "uncrop", "restore"),
                   help="digits-palette: inpaint (--mask, white = fill in), uncrop (--mask, default the right half) "
                        "or restore (the init image is the degraded picture); default restore")
    p.add_argument("--label", type=int, default=None,
                   help=f"class label: digits 0-9 (default: cycle 0..9), {MIXTURE} a component (default: none)")
    p.add_argument("--frames", type=int, default=None,
                   help="digits-video: frames per clip (default the model's 8; longer clips are extended with "
                        "reconstruction guidance, Ho et al. 2022); --out must end in .gif")
    p.add_argument("--out", default=None,
                   help="output .png (a grid when several images, each single image beside it as NAME-000.png); "
                        "default samples.png (with --from-png: never the source file)")
    p.add_argument("--from-png", default=None, help="reproduce the image(s) from a PNG written by jaxdiff")
    p.add_argument("--compile-cache", default=None,
                   help="persistent compilation cache folder; default $JAXDIFF_COMPILE_CACHE (off when unset)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_cpu_devices_arg(p)
    _add_cascade_args(p)


CONTROL_HELP = (
    "SD (text-to-image, --init-image, --mask): ControlNets (Zhang et al. 2023) and T2I-Adapters (Mou et al. 2023). "
    "Each repeatable option pairs by position: the k-th --control-scale / --control-start / --control-end goes with "
    "the k-th --controlnet, the k-th --adapter-scale with the k-th --adapter; a value given once applies to all. "
    "Control images: one --control for every ControlNet and adapter, or one each, in order: first one per "
    "--controlnet, then one per --adapter (e.g. --controlnet A --controlnet B --adapter C --control a.png "
    "--control b.png --control c.png). ControlNets resize their image to the output size (Lanczos, as diffusers); "
    "adapters read it resized likewise, in gray for a 1-channel adapter.")


def _add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet and T2I-Adapter", CONTROL_HELP)
    g.add_argument("--control", action="append", default=None, metavar="IMAGE",
                   help="a control image (edges, depth, pose, ...); see the pairing rule above")
    g.add_argument("--controlnet", action="append", default=None, metavar="PATH",
                   help="a ControlNet: a diffusers folder, an original single .safetensors file "
                        "(control_*.safetensors) or a built-in (digits-controlnet, for digits-sd)")
    g.add_argument("--control-scale", action="append", type=float, default=None, metavar="S",
                   help="ControlNet conditioning scale; default 1")
    g.add_argument("--control-start", action="append", type=float, default=None, metavar="F",
                   help="fraction of the steps at which the ControlNet starts acting, in [0, 1); default 0")
    g.add_argument("--control-end", action="append", type=float, default=None, metavar="F",
                   help="fraction of the steps at which it stops, in (0, 1], after --control-start; default 1")
    g.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: control on the conditional half only, residuals scaled from 0.1 to 1")
    g.add_argument("--adapter", action="append", default=None, metavar="PATH",
                   help="a T2I-Adapter: a diffusers folder or a built-in (digits-adapter, for digits-sd); several "
                        "make a MultiAdapter (features summed with their "
                        "scales)")
    g.add_argument("--adapter-scale", action="append", type=float, default=None, metavar="S",
                   help="T2I-Adapter conditioning scale; default 1")
    g.add_argument("--control-preprocess", action="append", default=None, choices=PREPROCESS,
                   help="turn a control image into a control map first: canny = Canny edges of the (resized) photo "
                        "(jaxdiff.control_images.canny, thresholds 0.1/0.2); pairs with --control by position, once "
                        "for all; default none")


PERSONAL_HELP = (
    "SD (text-to-image, --init-image, --mask, depth models, with ControlNets and adapters): LoRA adapters (Hu et al. "
    "2021; kohya, diffusers/PEFT, LyCORIS LoHa and LoKr files), textual-inversion embeddings (Gal et al. 2022) and "
    "AUTOMATIC1111 hypernetworks; each option repeats, and they combine. The suffix after the last ':' is the scale, "
    "token or strength; a path containing ':' is taken whole when it exists as given. The PNG records each file "
    "with its sha256: --from-png refuses a changed one.")


def _add_personal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA, textual inversion and hypernetworks", PERSONAL_HELP)
    g.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="a LoRA .safetensors file (or a diffusers LoRA folder) patching the U-Net and the text encoder "
                        "at SCALE (default 1; 0 = off, negative subtracts); pickle files (.ckpt, .pt, .bin) are "
                        "refused")
    g.add_argument("--embedding", action="append", default=None, metavar="PATH[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors; .pt / .bin read without running pickled code; an "
                        "AUTOMATIC1111 .png; a diffusers folder) triggered by TOKEN in the prompt; default token: the "
                        "file's own (diffusers: its key; AUTOMATIC1111: the file name without extension)")
    g.add_argument("--hypernetwork", action="append", default=None, metavar="PATH[:STRENGTH]",
                   help="an AUTOMATIC1111 hypernetwork (.pt read without running pickled code, or .safetensors) at "
                        "STRENGTH (default 1; 0 = off); several chain in the order given")


def _add_cpu_devices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="CPU devices to split each sampling batch over (CFG halves and images); default "
                        "XLA_FLAGS' host device count if set, else $JAXDIFF_CPU_DEVICES, else one per core; 1: a "
                        "single device. Each device used holds a copy of the weights; no progress bar when split")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args: argparse.Namespace, name: str) -> bool:
    value = getattr(args, name)
    return value is not None and value is not False


def _refuse_options(args: argparse.Namespace, allowed: set[str], what: str, own: Any, note: str = "") -> None:
    """A clear error for the first option given that is not in ``allowed``, naming the model's ``own`` options."""
    for name in vars(args):
        if name in ("func", "command") or name in allowed or not _given(args, name):
            continue
        valid = ", ".join(_flag(o) for o in sorted(own))
        raise CLIError(f"{_flag(name)} does not apply to the {what}{note}; its own options: {valid or 'none'}")


def _check_options(args: argparse.Namespace, kind: str) -> None:
    """Refuse options that do not apply to the model, and non-finite or out-of-range numbers (before any work)."""
    allowed = set(COMMON) | set(APPLIES[kind])
    if kind == "builtin" and args.model in UNCONDITIONAL_BUILTINS:
        allowed -= {"label", "guidance", "classifier_scale"}
    what = {"sd": f"Stable Diffusion folder {args.model}", "mixture": MIXTURE}.get(kind, f"built-in model {args.model}")
    _refuse_options(args, allowed, what, allowed - set(COMMON))
    if kind == "mixture" and _given(args, "guidance") and args.label is None:
        raise CLIError(f"--guidance applies to {MIXTURE} only with --label (classifier-free guidance to a component)")
    if kind == "builtin" and _given(args, "guidance") and (args.classifier_scale or 0) > 0:
        raise CLIError("--guidance (classifier-free) and --classifier-scale (classifier guidance) are alternatives; "
                       "give one")
    for name in ("guidance", "rescale", "strength", "classifier_scale"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CLIError(f"{_flag(name)} must be a finite number, got {value}")
    if args.classifier_scale is not None and args.classifier_scale < 0:
        raise CLIError(f"--classifier-scale must be >= 0, got {args.classifier_scale}")
    for name in ("num", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"{_flag(name)} must be at least 1, got {value}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be positive, got {args.steps}")
    if args.steps is not None and args.steps > MAX_STEPS and kind != "mixture":
        raise CLIError(f"--steps {args.steps} is more than the {MAX_STEPS} steps `jaxdiff sample` compiles for; "
                       f"use --steps {MAX_STEPS} or fewer")
    if args.schedule is not None and args.schedule not in schedule_names(args.model):
        raise CLIError(f"--schedule {args.schedule!r} does not apply to {args.model}; "
                       f"valid for it: {', '.join(schedule_names(args.model))}")
    if args.dtype == "float16":
        import jax

        if jax.default_backend() == "cpu":
            raise CLIError("--dtype float16 does not run on the CPU backend (XLA has no float16 matmul there); "
                           "use --dtype float32 or bfloat16, or a GPU")


def _check_seeds(seed: int, n: int) -> None:
    if not 0 <= seed or seed + n - 1 >= SEED_LIMIT:
        span = f"--seed {seed}" if n == 1 else f"--seed {seed} .. {seed + n - 1} ({n} images)"
        raise CLIError(f"{span} is outside [0, 2^32); choose a seed between 0 and {SEED_LIMIT - n}")


def _fill_defaults(args: argparse.Namespace, kind: str) -> None:
    if kind == "dit":
        from jaxdiff import builtin

        defaults = {"num": BUILTIN_DEFAULTS["num"], **builtin.DIT_DEFAULTS}
    else:
        defaults = {"sd": SD_DEFAULTS, "mixture": MIXTURE_DEFAULTS, "builtin": BUILTIN_DEFAULTS,
                    "palette": PALETTE_DEFAULTS}[kind]
    if kind == "sd" and args.model in builtin_pipelines():
        from jaxdiff import builtin

        defaults = {**defaults, **builtin.PIPELINE_DEFAULTS.get(args.model, {})}
    if kind == "builtin" and args.sampler == "langevin":
        from jaxdiff import builtin

        levels = builtin.builtin_config(args.model).get("sampling", {}).get("langevin", {}).get("num_levels")
        defaults = dict(defaults, schedule="ncsn_geometric", steps=levels or defaults["steps"])
    if kind == "builtin" and args.model in UNCONDITIONAL_BUILTINS:
        defaults = {k: v for k, v in defaults.items() if k not in ("guidance", "classifier_scale")}
    if kind == "builtin" and (args.classifier_scale or 0) > 0:
        defaults = {k: v for k, v in defaults.items() if k != "guidance"}  # classifier guidance replaces CFG
    if kind == "mixture" and args.label is None:
        defaults = {k: v for k, v in defaults.items() if k != "guidance"}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _targets(out: Path, n: int) -> list[Path]:
    """Every file a run writes: the PNG (a grid when n > 1) and the singles beside it."""
    return [out] + ([out.with_name(f"{out.stem}-{i:03d}{out.suffix}") for i in range(n)] if n > 1 else [])


def _output_path(args: argparse.Namespace, n: int) -> Path:
    """``--out`` checked (a .png file name), never a path of the ``--from-png`` source."""
    text = args.out if args.out is not None else "samples.png"
    out = Path(text)
    if out.is_dir() or text.endswith(("/", "\\")):
        raise CLIError(f"--out {text} is a folder; give a file name such as {out / 'samples.png'}")
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out {text} must end in .png (jaxdiff writes PNGs that carry their settings)")
    if out.parent.exists() and not out.parent.is_dir():
        raise CLIError(f"--out {text}: {out.parent} is a file, not a folder")
    if not args.from_png:
        return out
    source = Path(args.from_png).resolve()
    if source not in [p.resolve() for p in _targets(out, n)]:
        return out
    if args.out is not None:
        raise CLIError(f"--out {text} would overwrite the --from-png file {args.from_png}; choose another --out")
    k = 1
    while True:  # a fresh name beside the default one
        fresh = out.with_name(f"{out.stem}-repro{'' if k == 1 else k}{out.suffix}")
        if all(not p.exists() and p.resolve() != source for p in _targets(fresh, n)):
            return fresh
        k += 1


def _settings_png(args: argparse.Namespace, extra: dict) -> dict:
    return dict(model=args.model, seed=args.seed, jaxdiff_version=_version(), **extra)


# ---- mixture2d (scatter plot) -------------------------------------------------------------------

def _sample_mixture(args: argparse.Namespace) -> Path:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import guidance, mixtures, sampling, schedules
    from jaxdiff.images import save_png
    from jaxdiff.plotting import scatter_png
    from jaxdiff.samplers import get_sampler

    num = args.num
    mix = mixtures.ring_2d()
    sampler = get_sampler(args.sampler)
    make = schedules.get_schedule(args.schedule)
    cap = max(args.steps, schedules.DEFAULT_CAPACITY)  # any step count runs: the capacity grows with it
    sigmas = make(args.steps, 0.01, 40.0, capacity=cap)
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
    settings = _settings_png(args, dict(sampler=args.sampler, schedule=args.schedule, steps=args.steps, num=num,
                                        label=args.label, guidance=args.guidance))
    path = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:  # matplotlib draws; save_png writes once, with the settings
        from PIL import Image

        with Image.open(scatter_png(out, ref, Path(tmp) / "plot.png", title)) as im:
            picture = np.asarray(im.convert("RGB"), np.float32) / 255.0
    save_png(picture, path, settings)
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3)}))
    return path


# ---- built-in models (jaxdiff.builtin) ----------------------------------------------------------

def _sample_builtin(args: argparse.Namespace) -> Path:
    import numpy as np

    from jaxdiff import builtin
    from jaxdiff.images import grid, save_png

    options = {k: getattr(args, k) for k in ("sampler", "schedule", "steps", "guidance", "classifier_scale", "label")
               if getattr(args, k) is not None or k == "label"}
    t0 = time.perf_counter()
    images = builtin.sample_builtin(args.model, num=args.num, seed=args.seed, progress=not args.no_progress, **options)
    dt = time.perf_counter() - t0
    images = np.asarray(images)
    settings = _settings_png(args, dict(num=args.num, height=int(images.shape[1]), width=int(images.shape[2]),
                                        **options))
    zoom = max(1, 32 // images.shape[1])  # 8x8 digits: nearest-neighbour 4x so the grid is readable
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    cols = 10 if args.label is None and len(images) >= 10 else None  # label=None cycles 0..9: a column per class
    path = save_png(grid(images, cols=cols, pad=zoom), args.out, settings)
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3), "cpu_devices": _cpu_devices()}))
    return path


def _palette_models() -> dict[str, str]:
    """The built-in image-to-image models (digits-palette) and what each is."""
    return _builtin_table("BUILTIN_IMAGE_TO_IMAGE")


def _sample_palette(args: argparse.Namespace) -> Path:
    """``digits-palette``: the init image (and mask) read as 8x8 grey digits, ``--num`` draws, a grid PNG."""
    import numpy as np

    from jaxdiff.images import grid, save_png
    from jaxdiff.pipelines.palette import Palette, make_source

    if not args.init_image:
        raise CLIError(f"{args.model} is an image-to-image model: give --init-image (and --mask for inpainting)")
    if args.mask and args.task == "restore":
        raise CLIError("--mask applies to --task inpaint or uncrop, not restore")
    pal = Palette.from_builtin(args.model)
    size = (pal.config["network"]["sample_size"],) * 2
    image = _read_image("--init-image", args.init_image, size, grayscale=True)[None] * 2.0 - 1.0
    mask = _read_image("--mask", args.mask, size, grayscale=True)[None] if args.mask else None
    source, mask = make_source(image, args.task, mask, seed=args.seed)
    t0 = time.perf_counter()
    out = pal(source, mask=mask, known=image if mask is not None else None, steps=args.steps, seed=args.seed,
              sampler=args.sampler, schedule=args.schedule, samples=args.num, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    options = {k: getattr(args, k) for k in ("task", "sampler", "schedule", "steps", "num")}
    settings = _settings_png(args, dict(options, init_image=args.init_image, init_image_sha256=sha256(args.init_image),
                                        **({"mask": args.mask, "mask_sha256": sha256(args.mask)} if args.mask else {})))
    images = np.clip((np.concatenate([source[:1], out]) + 1.0) / 2.0, 0.0, 1.0).repeat(4, 1).repeat(4, 2)
    path = save_png(grid(images, cols=len(images), pad=4), args.out, settings)  # the source first, then the draws
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3)}))
    return path


def _dit_models() -> dict[str, str]:
    """The built-in class-conditional DiTs (digits-dit) and what each is."""
    return _builtin_table("BUILTIN_TRANSFORMERS")


def _sample_dit(args: argparse.Namespace) -> Path:
    """``digits-dit``: ``--num`` digits (``--label``, or 0-9 cycling) as a grid PNG (``builtin.sample_dit``)."""
    import numpy as np

    from jaxdiff import builtin
    from jaxdiff.images import grid, save_png

    if args.label is not None and not 0 <= args.label <= 9:
        raise CLIError(f"--label must be a digit 0-9, got {args.label}")
    options = {k: getattr(args, k) for k in ("sampler", "schedule", "steps", "guidance", "label")}
    t0 = time.perf_counter()
    images = np.asarray(builtin.sample_dit(args.model, num=args.num, seed=args.seed, **options))
    dt = time.perf_counter() - t0
    settings = _settings_png(args, dict(num=args.num, height=int(images.shape[1]), width=int(images.shape[2]),
                                        **options))
    images = images.repeat(4, axis=1).repeat(4, axis=2)  # 8x8 digits: nearest-neighbour 4x
    cols = 10 if args.label is None and len(images) >= 10 else None
    path = save_png(grid(images, cols=cols, pad=4), args.out, settings)
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3)}))
    return path


def _video_models() -> dict[str, str]:
    """The built-in video models (digits-video) and what each is."""
    return _builtin_table("BUILTIN_VIDEO")


VIDEO_DEFAULTS = dict(num=1)  # frames: the model's window; steps, guidance, sampler, schedule: its config's sampling


def _sample_video(args: argparse.Namespace) -> Path:
    """``digits-video``: ``--num`` clips of ``--frames`` frames of digit ``--label`` (default cycling 0..9), tiled
    side by side into one animated GIF (Pillow), each pixel 4x4; settings printed as JSON (a GIF carries none)."""
    from jaxdiff import builtin
    from jaxdiff.pipelines import video as V

    if args.from_png:
        raise CLIError("--from-png reproduces PNGs; digits-video writes GIFs (rerun with the printed settings)")
    _check_options(args, "video")
    out = Path(args.out if args.out is not None else "clip.gif")
    if out.suffix.lower() != ".gif" or out.is_dir():
        raise CLIError(f"--out {out} must be a .gif file name (digits-video writes an animated GIF)")
    model = V.load_video_model(builtin.builtin_folder(args.model))
    sampling = model.config.get("sampling", {})
    for k, v in {**VIDEO_DEFAULTS, "frames": model.window, "steps": sampling.get("steps", 20),
                 "guidance": sampling.get("guidance", 1.0), "sampler": sampling.get("sampler", "dpmpp_2m"),
                 "schedule": sampling.get("schedule", "karras")}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.frames < 1 or args.frames > 64:
        raise CLIError(f"--frames must be between 1 and 64, got {args.frames}")
    if args.label is not None and not 0 <= args.label <= 9:
        raise CLIError(f"--label must be a digit 0-9 (or omitted to cycle through them), got {args.label}")
    _check_seeds(args.seed, 1)
    labels = builtin.labels_for(args.num, args.label)
    t0 = time.perf_counter()
    clips = V.sample_long(model, labels, args.frames, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                          schedule=args.schedule, seed=args.seed)
    dt = time.perf_counter() - t0
    path = V.write_gif(V.tile_videos(clips, ncol=min(args.num, 10)), out)
    settings = _settings_png(args, {k: getattr(args, k) for k in ("label", "num", "frames", "guidance", "sampler",
                                                                  "schedule", "steps")})
    print(json.dumps({"out": str(path), **settings, "shape": list(clips.shape), "seconds": round(dt, 3)}))
    return path


def _cpu_devices() -> int:
    """JAX's CPU device count (printed with the results: --cpu-devices, $JAXDIFF_CPU_DEVICES or the cores)."""
    import jax

    return len(jax.devices("cpu"))


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


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (recorded for init images, masks, LoRAs ...); of a folder, the sha256 of
    its files' relative names and hashes, in sorted order."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in path.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\n".encode())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_image(flag: str, path: str, size: tuple[int, int] | None = None, grayscale: bool = False) -> Any:
    from PIL import UnidentifiedImageError

    from jaxdiff.images import load_image

    if not Path(path).is_file():
        raise CLIError(f"{flag} {path} does not exist")
    try:
        return load_image(path, size, grayscale=grayscale)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CLIError(f"{flag} {path} is not an image file that PIL can read ({type(e).__name__})") from None


def _sd_inputs(args: argparse.Namespace) -> dict:
    """Init image, mask and strength, read and checked before the model loads."""
    kw: dict[str, Any] = {}
    size = None if args.height is None or args.width is None else (args.height, args.width)
    if args.init_image:
        kw["image"] = image = _read_image("--init-image", args.init_image, size)
        kw["strength"] = args.strength if args.strength is not None else (1.0 if args.mask else 0.8)
    elif args.strength is not None:
        raise CLIError("--strength needs --init-image")
    if args.mask:
        if not args.init_image:
            raise CLIError("--mask needs --init-image (the picture to inpaint)")
        kw["mask"] = mask = _read_image("--mask", args.mask, size, grayscale=True)  # resized with the image
        if mask.shape[:2] != image.shape[:2]:
            raise CLIError(f"--mask is {mask.shape[0]}x{mask.shape[1]} but the init image is "
                           f"{image.shape[0]}x{image.shape[1]} (HxW); resize the mask to the image size")
    return kw


def _depth_pipeline(args: argparse.Namespace, inputs: dict) -> Any:
    """The depth-to-image pipeline when ``--model`` is an SD 2 depth folder (None otherwise), its inputs checked;
    ``--depth-map`` is read into ``inputs["depth_map"]``."""
    from jaxdiff.pipelines import depth2img

    path = model_path(args.model)
    if not (path.is_dir() and depth2img.is_depth_folder(path)):
        if args.depth_map:
            raise CLIError(f"--depth-map needs a depth-to-image model (SD 2 depth: a U-Net reading the latents and a "
                           f"depth channel); {args.model} is not one")
        return None
    if not args.init_image:
        raise CLIError(f"{args.model} is a depth-to-image model: give --init-image (the start picture and, without "
                       "--depth-map, the picture whose depth its DPT estimates)")
    if args.mask:
        raise CLIError("--mask does not apply to a depth-to-image model; use an inpainting model")
    if args.clip_skip or args.config:
        raise CLIError("--clip-skip and --config do not apply to a depth-to-image folder")
    if args.depth_map:
        if not Path(args.depth_map).is_file():
            raise CLIError(f"--depth-map {args.depth_map} does not exist")
        inputs["depth_map"] = depth2img.load_depth_map(args.depth_map)
    return depth2img.load(path, dtype=_dtype(args.dtype))


def _per_net(flag: str, values: list | None, n: int, what: str, default: Any) -> list:
    """One value per network: a flag given once applies to all ``n``, else it must be given ``n`` times."""
    if values is None:
        return [default] * n
    if len(values) not in (1, n):
        raise CLIError(f"{flag} is given {len(values)} times for {n} {what}; give it once (for all) or once per "
                       f"{what.rstrip('s')}, in the order of the {what}")
    return list(values) * (n if len(values) == 1 else 1)


def _control_spec(args: argparse.Namespace) -> dict | None:
    """ControlNet / T2I-Adapter options checked, broadcast and their images read before any model loads."""
    nets, adapters, images = list(args.controlnet or []), list(args.adapter or []), list(args.control or [])
    for flag in ("control_scale", "control_start", "control_end", "guess_mode"):
        if _given(args, flag) and not nets:
            fix = "; for T2I-Adapters use --adapter-scale" if flag == "control_scale" and adapters else ""
            raise CLIError(f"{_flag(flag)} needs --controlnet PATH (it sets a ControlNet){fix}")
    if args.adapter_scale is not None and not adapters:
        raise CLIError("--adapter-scale needs --adapter PATH (it sets a T2I-Adapter)")
    if not nets and not adapters:
        for flag in ("control", "control_preprocess"):
            if _given(args, flag):
                raise CLIError(f"{_flag(flag)} needs --controlnet PATH or --adapter PATH (the network that reads it)")
        return None
    if not images:
        raise CLIError(f"{'--controlnet' if nets else '--adapter'} needs --control IMAGE (its control image)")
    n = len(nets) + len(adapters)
    if len(images) not in (1, n):
        raise CLIError(f"{len(images)} --control images for {len(nets)} ControlNet(s) and {len(adapters)} adapter(s); "
                       f"give one (for all) or {n}: first one per --controlnet, then one per --adapter")
    preprocess = _per_net("--control-preprocess", args.control_preprocess, len(images), "--control images", "none")
    if len(images) == 1:
        images, preprocess = images * n, preprocess * n
    spec = dict(nets=nets, adapters=adapters, images=images, preprocess=preprocess, guess_mode=bool(args.guess_mode))
    for flag, what, default, k in (("control_scale", "ControlNets", 1.0, len(nets)),
                                   ("control_start", "ControlNets", 0.0, len(nets)),
                                   ("control_end", "ControlNets", 1.0, len(nets)),
                                   ("adapter_scale", "adapters", 1.0, len(adapters))):
        spec[flag] = values = _per_net(_flag(flag), getattr(args, flag), k, what, default)
        if not all(math.isfinite(v) for v in values):
            raise CLIError(f"{_flag(flag)} must be a finite number, got {values}")
    for k, (a, b) in enumerate(zip(spec["control_start"], spec["control_end"])):
        if not 0.0 <= a < b <= 1.0:
            raise CLIError(f"ControlNet {k}: --control-start {a:g} and --control-end {b:g} must satisfy "
                           "0 <= start < end <= 1 (fractions of the steps)")
    from jaxdiff.convert.safetensors_io import refuse_pickle

    spec["nets"] = nets = [str(control_path(p)) for p in nets]
    spec["adapters"] = adapters = [str(control_path(p)) for p in adapters]
    for path in nets:
        refuse_pickle(path)
        if not Path(path).exists():
            raise CLIError(f"--controlnet {path} does not exist (a diffusers ControlNet folder, a .safetensors file "
                           f"or a built-in: {', '.join(_builtin_controls())})")
    for path in adapters:
        if not Path(path).is_dir():
            raise CLIError(f"--adapter {path} is not a folder (a diffusers T2I-Adapter folder: config.json + "
                           f"safetensors, or a built-in: {', '.join(_builtin_controls())})")
    spec["pictures"] = [_read_control(path) for path in images]
    return spec


def _read_control(path: str) -> Any:
    """A control image file as an RGB PIL image (resized later, to the output size)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise CLIError(f"--control {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CLIError(f"--control {path} is not an image file that PIL can read ({type(e).__name__})") from None


def _control_picture(picture: Any, preprocess: str, height: int, width: int) -> Any:
    """``none``: the PIL image as given (ControlNets resize it as diffusers does); ``canny``: the Canny edges of the
    photo resized to the output size, as a float (1, H, W, 3) map in [0, 1]."""
    import numpy as np
    from PIL import Image

    if preprocess == "none":
        return picture
    from jaxdiff.control_images import canny, control_image

    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(control_image(canny(np.asarray(picture)[None])))


def _adapter_picture(picture: Any, in_channels: int, height: int, width: int) -> Any:
    """A T2I-Adapter's control image at the output size: PIL (Lanczos, gray for one channel) or the float map."""
    import numpy as np
    from PIL import Image

    if isinstance(picture, Image.Image):
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        return picture.convert("L") if in_channels == 1 else picture
    return np.asarray(picture)[..., :1] if in_channels == 1 else picture


def control_transform(sd: Any, spec: dict, height: int, width: int) -> Any:
    """The network transform of checked control options (:func:`_control_spec`): ControlNets, then adapters."""
    from jaxdiff.conditioning import chain

    nets, adapters = spec["nets"], spec["adapters"]
    pictures = [_control_picture(p, m, height, width) for p, m in zip(spec["pictures"], spec["preprocess"])]
    parts = []
    if nets:
        from jaxdiff.pipelines.controlnet import controlnet_transform

        one = len(nets) == 1
        pick = (lambda v: v[0]) if one else (lambda v: v)  # noqa: E731 - one net: the single-net call
        parts.append(controlnet_transform(sd, pick(nets), pick(pictures[:len(nets)]), height=height, width=width,
                                          scale=pick(spec["control_scale"]), start=pick(spec["control_start"]),
                                          end=pick(spec["control_end"]), guess_mode=spec["guess_mode"]))
    if adapters:
        from jaxdiff.convert.folders import load_model_folder
        from jaxdiff.models.t2i_adapter import MultiAdapter, t2i_adapter

        dtype = sd.models.unet.module().dtype
        models = [load_model_folder(p, class_name="T2IAdapter", dtype=dtype) for p in adapters]
        images = [_adapter_picture(p, m.config.in_channels, height, width)
                  for p, m in zip(pictures[len(nets):], models)]
        if len(models) == 1:
            parts.append(t2i_adapter(models[0], images[0], spec["adapter_scale"][0]))
        else:
            parts.append(t2i_adapter(MultiAdapter(models), images, spec["adapter_scale"]))
    return parts[0] if len(parts) == 1 else chain(*parts)


def _control_settings(args: argparse.Namespace) -> dict:
    """The control options as given (paths as given, control images with their sha256), for the PNG."""
    if not (args.controlnet or args.adapter):
        return {}
    out = {k: getattr(args, k) for k in CONTROL_OPTIONS}
    out["guess_mode"] = bool(args.guess_mode)
    out["control_sha256"] = [sha256(p) for p in args.control]
    return out


def _split_number(flag: str, item: Any, what: str) -> tuple[str, float]:
    """``PATH[:NUMBER]`` as (path, number): the whole text when it names an existing path (or has no ':'), else
    split at the last ':'. Entries a PNG recorded (``--from-png``) arrive split already."""
    if isinstance(item, (tuple, list)):
        return str(item[0]), float(item[1])
    if ":" not in item or Path(item).exists():
        return item, 1.0
    path, tail = item.rsplit(":", 1)
    try:
        value = float(tail)
    except ValueError:
        raise CLIError(f"{flag} {item}: {tail!r} is not a {what} and no file {item} exists; give PATH or "
                       f"PATH:{what.upper()} (e.g. {path}:0.8)") from None
    if not math.isfinite(value):
        raise CLIError(f"{flag} {item}: the {what} must be a finite number, got {tail}")
    return path, value


def _split_token(item: Any) -> tuple[str, str | None]:
    """``--embedding PATH[:TOKEN]`` as (path, token or None): the whole text when it names an existing path."""
    if isinstance(item, (tuple, list)):
        return str(item[0]), item[1]
    if ":" not in item or Path(item).exists():
        return item, None
    path, token = item.rsplit(":", 1)
    if not Path(path).exists():
        raise CLIError(f"--embedding {item}: neither {item} nor {path} exists (an embedding file or folder)")
    if not token or any(c.isspace() for c in token):
        raise CLIError(f"--embedding {item}: the token after ':' must be one word without spaces, got {token!r}")
    return path, token


def _refuse_pickle(flag: str, path: str, what: str) -> None:
    from jaxdiff.convert.safetensors_io import is_pickle_path

    if is_pickle_path(path):
        raise CLIError(f"{flag} {path} is a pickle file, which can run code when opened: jaxdiff reads {what} from "
                       ".safetensors only; convert it once in a trusted PyTorch environment (torch.load(path, "
                       "weights_only=True), then safetensors.torch.save_file)")


def _personal_spec(args: argparse.Namespace) -> dict | None:
    """--lora / --embedding / --hypernetwork parsed and their files read and checked before any model loads."""
    from jaxdiff import lora
    from jaxdiff import textual_inversion as ti
    from jaxdiff.models import hypernetwork as hnet

    if not any(getattr(args, k) for k in PERSONAL_OPTIONS):
        return None
    spec: dict[str, list] = {"loras": [], "embeddings": [], "hypernetworks": []}
    for item in args.lora or []:
        path, scale = _split_number("--lora", item, "scale")
        _refuse_pickle("--lora", path, "LoRAs")
        if not Path(path).exists():
            raise CLIError(f"--lora {path} does not exist (a LoRA .safetensors file or a diffusers LoRA folder)")
        try:
            tensors, meta = lora.read_lora_file(path)
        except (ValueError, OSError) as e:
            raise CLIError(f"--lora {path}: {e}") from None
        spec["loras"].append(dict(path=path, scale=scale, tensors=tensors, metadata=meta))
    for item in args.embedding or []:
        path, token = _split_token(item)
        if not Path(path).exists():
            raise CLIError(f"--embedding {path} does not exist (an embedding file or a diffusers folder)")
        try:
            emb = ti.read_embedding(path, token)
        except (ValueError, OSError) as e:
            raise CLIError(f"--embedding {path}: {e}") from None
        spec["embeddings"].append(dict(path=path, token=emb.token, embedding=emb))
    for item in args.hypernetwork or []:
        path, strength = _split_number("--hypernetwork", item, "strength")
        if not Path(path).is_file():
            raise CLIError(f"--hypernetwork {path} does not exist (a hypernetwork .pt or .safetensors file)")
        try:
            hn = hnet.load_hypernetwork(path)
        except (ValueError, OSError) as e:
            raise CLIError(f"--hypernetwork {path}: {e}") from None
        spec["hypernetworks"].append(dict(path=path, strength=strength, hypernetwork=hn))
    return spec


def _attention_widths(sd: Any) -> set[int]:
    """The context widths the U-Net's attention layers see: its block widths (self-attention) and text width."""
    unet = sd.models.unet
    cfg = getattr(unet, "base", unet).module().config
    cross = cfg.cross_attention_dim
    cross = cross if isinstance(cross, (tuple, list)) else (cross,)
    return {int(w) for w in (*cfg.block_out_channels, *cross)}


def personal_models(sd: Any, spec: dict | None, prompts: Sequence[str] = ()) -> tuple[Any, list]:
    """(``sd`` with the embeddings and the LoRAs' text-encoder patches, [LoRA U-Net transform, hypernetworks]), the
    transforms that apply (None entries dropped). The Python API calls of the same settings: embeddings
    (``textual_inversion.add_embeddings``), then ``lora.apply``, then ``hypernetwork.hypernetworks``."""
    if spec is None:
        return sd, []
    from jaxdiff import lora
    from jaxdiff import textual_inversion as ti
    from jaxdiff.models import hypernetwork as hnet
    from jaxdiff.models.patches import PatchMismatchError

    base = sd
    if spec["embeddings"]:
        vocab, seen = sd.tokenizer.get_vocab(), set()
        for e in spec["embeddings"]:
            for name in e["embedding"].tokens:
                if name in vocab or name in seen:
                    raise CLIError(f"--embedding {e['path']}: its token {name!r} is already in the model's vocabulary "
                                   f"or another embedding's; give another: --embedding {e['path']}:NEWTOKEN")
                seen.add(name)
        try:
            sd = ti.add_embeddings(sd, [e["embedding"] for e in spec["embeddings"]])
        except ValueError as err:
            raise CLIError(f"--embedding: {err}") from None
        for e in spec["embeddings"]:
            if not any(e["token"] in p for p in prompts):
                warnings.warn(f"--embedding {e['path']}: its token {e['token']!r} is in no prompt, so it does nothing")
    nets = []
    if spec["loras"]:
        adapters = []
        for item in spec["loras"]:
            try:
                adapters.append(lora.load_lora(item["tensors"], base, name=Path(item["path"]).stem,
                                               metadata=item["metadata"]))
            except PatchMismatchError as err:
                raise CLIError(f"--lora {item['path']}: {err}") from None
        sd, net = lora.apply(sd, adapters, [item["scale"] for item in spec["loras"]])
        nets.append(net)
    if spec["hypernetworks"]:
        widths = _attention_widths(base)
        for item in spec["hypernetworks"]:
            own = sorted(item["hypernetwork"].modules)
            if not widths & set(own):
                raise CLIError(f"--hypernetwork {item['path']} has modules for context widths {own}, but no attention "
                               f"layer of this U-Net has those widths ({', '.join(map(str, sorted(widths)))}): it was "
                               "made for another model")
        nets.append(hnet.hypernetworks(*[(item["hypernetwork"], item["strength"]) for item in spec["hypernetworks"]]))
    return sd, [n for n in nets if n is not None]


def _personal_settings(spec: dict | None) -> dict:
    """The options for the PNG: paths as given, scales / tokens / strengths, each file's sha256."""
    if spec is None:
        return {}
    out: dict[str, Any] = {}
    for flag, group, value in (("lora", "loras", "scale"), ("embedding", "embeddings", "token"),
                               ("hypernetwork", "hypernetworks", "strength")):
        items = spec[group]
        if items:
            out[flag] = [item["path"] for item in items]
            out[f"{flag}_{value}"] = [item[value] for item in items]
            out[f"{flag}_sha256"] = [sha256(item["path"]) for item in items]
    return out


def _sample_sd(args: argparse.Namespace) -> Path:
    import jax

    from jaxdiff import parallel
    from jaxdiff.images import grid, save_png
    from jaxdiff.pipelines import StableDiffusion

    prompts = _prompts(args)
    n = len(prompts)
    inputs = _sd_inputs(args)
    control = _control_spec(args)
    personal = _personal_spec(args)
    config = dict(config=args.config) if getattr(args, "config", None) else {}
    depth = _depth_pipeline(args, inputs)
    sd = depth.sd if depth is not None else StableDiffusion.from_pretrained(
        model_path(args.model), dtype=_dtype(args.dtype), clip_skip=args.clip_skip, **config)
    sd, personal_nets = personal_models(sd, personal, prompts)
    if depth is not None:
        depth = dataclasses.replace(depth, sd=sd)
    seeds = [args.seed + i for i in range(n)]
    plan = sd.plan(args.steps, args.sampler, args.schedule)  # warns once when the folder's scheduler has no equivalent
    kw = dict(negative=args.negative, steps=args.steps, sampler=plan.sampler_name, schedule=plan.schedule_name,
              guidance=args.guidance, rescale=args.rescale, seed=seeds, height=args.height, width=args.width, **inputs)
    if control is not None:  # the output size: as given, else the init image's, else the model's
        init = inputs.get("image")
        height = args.height or (init.shape[0] if init is not None else sd.default_size)
        width = args.width or (init.shape[1] if init is not None else sd.default_size)
        kw["network_transform"] = control_transform(sd, control, height, width)
    if personal_nets:  # ControlNets / adapters innermost, then the LoRA's U-Net patches, then hypernetworks
        from jaxdiff.conditioning import chain

        kw["network_transform"] = chain(kw.get("network_transform"), *personal_nets)
    t0 = time.perf_counter()
    if depth is not None:  # depth-to-image: one device, the depth map the user's or the DPT's
        for k in ("height", "width"):
            kw.pop(k)
        images = depth(prompts, progress=not args.no_progress, **kw)
    elif jax.process_count() > 1:  # jax.distributed: split over every host's devices
        images = parallel.generate(sd, prompts, **kw)
    else:  # on CPU split over the cores (jaxdiff.cpu_devices), else one device
        images = sd(prompts, progress=not args.no_progress, **kw)
    dt = time.perf_counter() - t0
    files = {}
    for flag in ("init_image", "mask", "depth_map"):
        path = getattr(args, flag)
        if path:  # absolute, with the bytes' hash: --from-png works from any folder and notices a changed file
            files.update({flag: str(Path(path).resolve()), f"{flag}_sha256": sha256(path)})
        else:
            files[flag] = None
    name = args.model if args.model in builtin_pipelines() else str(Path(args.model).resolve())
    base = dict(model=name, negative=args.negative or "", sampler=plan.sampler_name,
                schedule=plan.schedule_name, steps=args.steps, guidance=args.guidance, rescale=args.rescale,
                height=int(images.shape[1]), width=int(images.shape[2]), dtype=args.dtype,
                clip_skip=args.clip_skip or 0, strength=inputs.get("strength"), jaxdiff_version=_version(),
                config=str(Path(args.config).resolve()) if args.config else None, **files, **_control_settings(args),
                **_personal_settings(personal))
    out = Path(args.out)
    paths = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        single = out if n == 1 else _targets(out, n)[i + 1]
        paths.append(save_png(images[i], single, dict(base, prompt=[p], seed=[s])))
    if n > 1:
        save_png(grid(images), out, dict(base, prompt=prompts, seed=seeds))
    print(json.dumps({"out": str(out), "images": [str(p) for p in paths], "seconds": round(dt, 3),
                      "cpu_devices": _cpu_devices(),
                      "sampler": plan.sampler_name, "steps": args.steps, "seed": args.seed}))
    return out


def _recorded_file(s: dict, key: str, png: str) -> str | None:
    """A file a PNG's settings name, checked against its recorded sha256 (relative paths: cwd, then the PNG's folder)."""
    path = s.get(key)
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(png).resolve().parent / p
    if not p.is_file():
        raise CLIError(f"--from-png {png}: its {key.replace('_', ' ')} {path} is missing; restore it to reproduce")
    digest = s.get(f"{key}_sha256")
    if digest is not None and sha256(p) != digest:
        raise CLIError(f"--from-png {png}: {p} changed since the PNG was made (sha256 differs); "
                       "restore the original file to reproduce the image")
    return str(p)


def _apply_png_settings(args: argparse.Namespace) -> None:
    """Fill ``args`` from a jaxdiff PNG's settings (an explicit --out is kept)."""
    from PIL import UnidentifiedImageError

    from jaxdiff.images import read_settings

    try:
        s = read_settings(args.from_png)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise CLIError(f"--from-png {args.from_png} does not exist") from None
        raise CLIError(f"--from-png {args.from_png} is not an image file that PIL can read") from None
    args.model = s["model"]
    if args.model in _palette_models():
        for k in ("sampler", "schedule", "steps", "seed", "task", "num"):
            setattr(args, k, s.get(k))
        args.init_image = _recorded_file(s, "init_image", args.from_png)
        args.mask = _recorded_file(s, "mask", args.from_png)
        return
    if args.model in builtin_models() or args.model in _dit_models():
        kind = "mixture" if args.model == MIXTURE else "dit" if args.model in _dit_models() else "builtin"
        for k in ("sampler", "schedule", "steps", "seed", *APPLIES[kind]):
            if k in s:
                setattr(args, k, s[k])
        return
    prompts, seeds = s["prompt"], s["seed"]
    if seeds != [seeds[0] + i for i in range(len(seeds))]:
        raise CLIError(f"{args.from_png}: seeds {seeds} are not consecutive; reproduce with the pipeline API")
    args.prompt, args.prompts_file, args.batch, args.seed = prompts, None, 1, seeds[0]
    for k in ("negative", "sampler", "schedule", "steps", "guidance", "rescale", "height", "width", "dtype",
              "clip_skip", "strength", "config"):
        setattr(args, k, s.get(k))
    args.init_image = _recorded_file(s, "init_image", args.from_png)
    args.mask = _recorded_file(s, "mask", args.from_png)
    args.depth_map = _recorded_file(s, "depth_map", args.from_png)
    args.negative = args.negative or None
    args.clip_skip = args.clip_skip or None
    _apply_control_settings(args, s)
    _apply_personal_settings(args, s)


def _apply_personal_settings(args: argparse.Namespace, s: dict) -> None:
    """The LoRAs, embeddings and hypernetworks a PNG recorded, each file found (cwd, then the PNG's folder) and
    checked against its sha256; passed on split, as (path, scale / token / strength)."""
    for flag, value in (("lora", "scale"), ("embedding", "token"), ("hypernetwork", "strength")):
        paths = s.get(flag)
        if not paths:
            setattr(args, flag, None)
            continue
        digests = s.get(f"{flag}_sha256") or [None] * len(paths)
        values = s.get(f"{flag}_{value}") or [None if flag == "embedding" else 1.0] * len(paths)
        setattr(args, flag, [(_recorded_path(p, args.from_png, _flag(flag), d), v)
                             for p, d, v in zip(paths, digests, values)])


def _recorded_path(path: str, png: str, flag: str, digest: str | None = None) -> str:
    """A path a PNG recorded as given: relative ones from the cwd, else the PNG's folder; checked against ``digest``."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(png).resolve().parent / p
    if not p.exists():
        raise CLIError(f"--from-png {png}: its {flag} {path} is missing; restore it to reproduce")
    if digest is not None and sha256(p) != digest:
        raise CLIError(f"--from-png {png}: {flag} {p} changed since the PNG was made (sha256 differs); "
                       "restore the original file to reproduce the image")
    return str(p) if p != Path(path) else path


def _apply_control_settings(args: argparse.Namespace, s: dict) -> None:
    """The ControlNet / T2I-Adapter options a PNG recorded (none: no control)."""
    for k in CONTROL_OPTIONS:
        setattr(args, k, s.get(k))
    args.guess_mode = bool(args.guess_mode)
    digests = s.get("control_sha256") or [None] * len(args.control or [])
    args.control = None if args.control is None else [
        _recorded_path(p, args.from_png, "--control", d) for p, d in zip(args.control, digests)]
    for k in ("controlnet", "adapter"):
        if getattr(args, k) is not None:
            setattr(args, k, [p if p in _builtin_controls() else _recorded_path(p, args.from_png, _flag(k))
                              for p in getattr(args, k)])


def cmd_sample(args: argparse.Namespace) -> int:
    from jaxdiff import compile_cache

    if args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:
        compile_cache.from_env()
    if args.from_png:
        _apply_png_settings(args)
    if args.model is None:
        args.model = default_model()
    if _is_unclip(args.model):
        _sample_unclip(args)
        return 0
    kind = model_kind(args.model)
    if kind == "video":
        _sample_video(args)
        return 0
    if kind == "cascade":
        _sample_cascade(args)
        return 0
    _check_options(args, kind)
    _fill_defaults(args, kind)
    n = len(_prompts(args)) if kind == "sd" else 1
    _check_seeds(args.seed, n)
    args.out = str(_output_path(args, n))
    names = builtin_models()
    if args.model == MIXTURE:
        _sample_mixture(args)
    elif args.model in names:
        _sample_builtin(args)
    elif kind == "sd":
        _sample_sd(args)
    elif kind == "palette":
        _sample_palette(args)
    elif kind == "dit":
        _sample_dit(args)
    else:
        raise CLIError(f"unknown model {args.model!r}: not a folder or .safetensors file, and not a built-in model "
                       f"(built-in: {', '.join(sampleable_models())})")
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

    info: dict[str, Any] = {
        "jaxdiff": _version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "samplers": sorted(SAMPLERS),
        "schedules": {"stable_diffusion_folder": list(schedule_names_sd()),
                      **{name: list(schedule_names(name)) for name in builtin_models()}},
        "models": sampleable_models(),
        "encoders": list(_builtin_encoders()),
        "controls": list(_builtin_controls()),
    }
    for name in [*builtin_pipelines(), *_dit_models()]:
        info["schedules"][name] = list(schedule_names_sd())
    for name in [*_palette_models(), *_video_models()]:
        info["schedules"][name] = list(schedule_names(name))
    for name in [*_cascade_models(), *_unclip_models()]:
        info["schedules"][name] = []  # their stages sample on their schedulers' own steps: no --schedule
    if args.model:
        path = model_path(args.model)
        if not path.exists():
            raise CLIError(f"model {args.model} does not exist (a diffusers folder, an original .safetensors file "
                           f"or a built-in pipeline: {', '.join(builtin_pipelines())})")
        if _is_cascade(str(path)):
            info["model"] = cascade_summary(path)
        else:
            info["model"] = file_summary(path) if path.is_file() else folder_summary(path)
            info["model"]["schedules"] = list(schedule_names_sd())
    print(json.dumps(info, indent=2))
    return 0


def _builtin_controls() -> dict[str, str]:
    return _builtin_table("BUILTIN_CONTROLS")


def control_path(path: str) -> Path:
    """A ``--controlnet`` / ``--adapter``: a built-in side network's shipped folder (``digits-controlnet``), else the
    path given."""
    if path in _builtin_controls():
        from jaxdiff import builtin

        return builtin.builtin_folder(path)
    return Path(path)


def _builtin_encoders() -> dict[str, str]:
    return _builtin_table("BUILTIN_ENCODERS")


def file_summary(path: str | Path) -> dict:
    """The configs jaxdiff infers for an original SD 1.x / 2.x single .safetensors file, and its tensor count."""
    from jaxdiff.convert import open_safetensors
    from jaxdiff.convert.ldm import infer_configs, is_ldm_layout, text_encoder_kind
    from jaxdiff.convert.safetensors_io import refuse_pickle

    refuse_pickle(Path(path))
    with open_safetensors(path) as t:
        if not is_ldm_layout(t.keys()):
            raise CLIError(f"{path} is not an original Stable Diffusion checkpoint; pass a diffusers folder")
        shapes = dict(t.shapes)
        kind = text_encoder_kind(shapes)
    return {"path": str(Path(path).resolve()), "format": "original Stable Diffusion single file",
            "text_encoder": kind, "tensors": len(shapes), "inferred_configs": infer_configs(shapes)}


# ---- bench --------------------------------------------------------------------------------------

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
_BENCH_MODULE = "jaxdiff_benchmarks_throughput"


def bench_module() -> Any:
    """``benchmarks/throughput.py`` of the source checkout this jaxdiff runs from (loaded once).

    The measurement is a benchmark, not part of the library, so it lives beside the other benchmarks;
    an installed jaxdiff without that folder gets a one-line error saying where to run from."""
    import importlib.util

    if _BENCH_MODULE in sys.modules:
        return sys.modules[_BENCH_MODULE]
    if not BENCH_SCRIPT.is_file():
        raise CLIError(f"`jaxdiff bench` runs {BENCH_SCRIPT.relative_to(BENCH_SCRIPT.parents[1])} of a source "
                       f"checkout, not found at {BENCH_SCRIPT}; install jaxdiff from a checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(_BENCH_MODULE, BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_BENCH_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_BENCH_MODULE]
        raise
    return module


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxdiff import compile_cache

    throughput = bench_module()
    if args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:
        compile_cache.from_env()
    model = None if args.model is None else str(model_path(args.model))
    result = throughput.run(args.size, model, batch=args.batch, steps=args.steps, guidance=args.guidance,
                            sampler=args.sampler, repeats=args.repeats)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    print(f"{result['model']}: {result['resolution']} {result['dtype']} on {result['device']}, batch {args.batch}, "
          f"{args.steps} steps: {result['images_per_s']:.3g} images/s", file=sys.stderr)
    return 0


def _bench_resolution(cfg: dict) -> str:
    side = cfg["unet"]["sample_size"] * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    return f"{side}x{side}"


def _edit_real_image(args: argparse.Namespace) -> dict | None:
    """``jaxdiff edit --image``: the real image (read as ``--init-image``: resized when --height and --width are
    both given), its sha256, the inversion and its step count; options that do not apply are refused."""
    if not args.image:
        for flag, value in (("--inversion", args.inversion), ("--inversion-steps", args.inversion_steps)):
            if value is not None:
                raise CLIError(f"{flag} applies to a real image: give --image PNG")
        return None
    if args.sampler not in (None, "ddim"):
        raise CLIError(f"--sampler {args.sampler}: a real image is inverted and edited by plain DDIM; drop --sampler")
    if args.negative:
        raise CLIError("--negative does not apply with --image: the inversion sets the unconditional embeddings")
    if args.steps is not None and args.inversion_steps is not None and args.steps != args.inversion_steps:
        raise CLIError(f"--steps {args.steps} and --inversion-steps {args.inversion_steps} differ: the edit runs the "
                       "inversion's steps (one unconditional embedding per step); give one of them")
    steps = next((v for v in (args.inversion_steps, args.steps) if v is not None), 50)
    if steps < 1:
        raise CLIError(f"--inversion-steps must be at least 1, got {steps}")
    size = None if args.height is None or args.width is None else (args.height, args.width)
    return {"image": _read_image("--image", args.image, size), "path": str(Path(args.image).resolve()),
            "sha256": sha256(args.image), "inversion": args.inversion or "null-text", "steps": steps}


def cmd_edit(args: argparse.Namespace) -> int:
    """``jaxdiff edit``: the source and the edited image (PNGs with their settings), optionally the words' maps."""
    from jaxdiff import editing
    from jaxdiff.images import save_png
    from jaxdiff.pipelines import StableDiffusion

    reweight = {}
    for item in args.reweight:
        word, eq, factor = item.partition("=")
        try:
            reweight[word] = float(factor) if eq and word else float("nan")
        except ValueError:
            reweight[word] = float("nan")
        if not math.isfinite(reweight[word]):
            raise CLIError(f"--reweight {item}: give WORD=FACTOR with a finite number, e.g. thick=2")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out {args.out} must end in .png (jaxdiff writes PNGs that carry their settings)")
    if args.blend_composite and not args.blend:
        raise CLIError("--blend-composite pastes the edit inside the local-blend mask: give --blend WORDS too")
    if args.blend_subtract and not args.blend:
        raise CLIError("--blend-subtract takes cells out of the local-blend mask: give --blend WORDS too")
    if len(args.blend_threshold) > 2:
        raise CLIError(f"--blend-threshold takes one value, or two (the blend words', the subtracted words'), "
                       f"got {len(args.blend_threshold)}")
    if not 0.0 <= args.blend_start <= 1.0:
        raise CLIError(f"--blend-start is a fraction of the steps in [0, 1], got {args.blend_start}")
    threshold = args.blend_threshold[0] if len(args.blend_threshold) == 1 else tuple(args.blend_threshold)
    real = _edit_real_image(args)
    sd = StableDiffusion.from_pretrained(model_path(args.model))
    opts = dict(cross_steps=args.cross_steps, self_steps=args.self_steps, mode=args.mode, blend_words=args.blend,
                blend_threshold=threshold, blend_normalize=args.blend_normalize, reweight=reweight,
                blend_composite=args.blend_composite, blend_subtract=args.blend_subtract, blend_start=args.blend_start)
    t0 = time.perf_counter()
    if real:
        r = editing.edit_image(sd, real["image"], args.prompt, args.target, steps=real["steps"],
                               guidance=args.guidance, inversion=real["inversion"], **opts)
    else:
        r = editing.edit(sd, args.prompt, args.target, seed=args.seed, steps=args.steps or 20, guidance=args.guidance,
                         negative=args.negative, sampler=args.sampler, height=args.height, width=args.width, **opts)
    dt = time.perf_counter() - t0
    settings = dict(model=args.model, source_prompt=args.prompt, target=args.target, mode=r.mode, seed=args.seed,
                    steps=args.steps or 20, guidance=args.guidance, sampler=args.sampler, negative=args.negative,
                    cross_steps=args.cross_steps, self_steps=args.self_steps, blend=args.blend,
                    blend_threshold=threshold, blend_normalize=args.blend_normalize,
                    blend_composite=args.blend_composite, blend_subtract=args.blend_subtract,
                    blend_start=args.blend_start, reweight=reweight, jaxdiff_version=_version())
    if real:  # the real image's source row is its reconstruction: DDIM from the inverted latents, no seed
        settings.update(steps=real["steps"], sampler="ddim", seed=None, real_image=real["path"],
                        real_image_sha256=real["sha256"], inversion=real["inversion"], inversion_steps=real["steps"])
    else:
        settings.update(height=r.images.shape[1], width=r.images.shape[2])
    source = out.with_name(f"{out.stem}-source{out.suffix}")
    save_png(r.images[1], out, dict(settings, prompt=[args.target], image="edit"))
    save_png(r.images[0], source, dict(settings, prompt=[args.prompt], image="reconstruction" if real else "source"))
    result = {"out": str(out), "source": str(source), "mode": r.mode, "seconds": round(dt, 3)}
    if args.attention_maps:
        result["attention_maps"] = str(save_png(editing.maps_grid(r), args.attention_maps,
                                                dict(settings, words=list(r.maps))))
    print(json.dumps(result))
    return 0


# ---- unCLIP / DALL-E 2 folders (diffusers UnCLIPPipeline, UnCLIPImageVariationPipeline) -------------------

UNCLIP_PIPELINES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
DIGITS_UNCLIP = "UnCLIPDigits"  # jaxdiff.pipelines.unclip_digits: prior + latent decoder, no super-resolution stage
DIGITS_UNCLIP_DEFAULTS = dict(prior_steps=25, steps=20, prior_guidance=4.0, guidance=3.0, batch=1)
UNCLIP_DEFAULTS = dict(prior_steps=25, steps=25, super_res_steps=7, prior_guidance=4.0, guidance=8.0, batch=1)
UNCLIP_OPTIONS = ("prompt", "prompts_file", "batch", "guidance", "init_image", "prior_steps", "prior_guidance",
                  "super_res_steps")


def _unclip_class(model: str) -> str | None:
    """The ``_class_name`` of an unCLIP ``--model`` (one of :data:`UNCLIP_PIPELINES`, or ``UnCLIPDigits`` for a
    built-in digits-unclip folder), else None."""
    if model in _unclip_models():
        return DIGITS_UNCLIP
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return None
    try:
        kind = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        return None
    return kind if kind in UNCLIP_PIPELINES + (DIGITS_UNCLIP,) else None


def _is_unclip(model: str) -> bool:
    """A diffusers unCLIP folder (``model_index.json`` naming one of :data:`UNCLIP_PIPELINES`) or digits-unclip."""
    return _unclip_class(model) is not None


def _add_unclip_args(p: argparse.ArgumentParser) -> None:
    d = UNCLIP_DEFAULTS
    p.add_argument("--prior-steps", type=int, default=None,
                   help=f"unCLIP folders: the prior's steps (--steps: the decoder's); default {d['prior_steps']}")
    p.add_argument("--prior-guidance", type=float, default=None,
                   help=f"unCLIP folders: the prior's classifier-free guidance (--guidance: the decoder's); default "
                        f"{d['prior_guidance']:g}")
    p.add_argument("--super-res-steps", type=int, default=None,
                   help=f"unCLIP folders: the super-resolution stage's steps; default {d['super_res_steps']}")


def _sample_unclip(args: argparse.Namespace) -> Path:
    """An unCLIP model: text to image (prior, decoder, super-resolution in one compiled program) from --prompt, or
    variations of --init-image (its CLIP image embedding decoded); the images as a PNG (a grid when several), the
    decoder's low-resolution images beside it as NAME-decoder.png (diffusers unCLIP folders; digits-unclip has no
    super-resolution stage)."""
    import numpy as np

    from jaxdiff.images import grid, save_png

    digits = _unclip_class(args.model) == DIGITS_UNCLIP
    what = f"unCLIP model {args.model}" if digits else f"unCLIP folder {args.model}"
    options = tuple(o for o in UNCLIP_OPTIONS if not (digits and o == "super_res_steps"))
    allowed = set(COMMON) - {"sampler", "schedule", "from_png"} | set(options)
    _refuse_options(args, allowed, what, options + ("steps", "seed", "out"),
                    " (its prior and decoder sample with DPM-Solver++ 2M)" if digits
                    else " (its stages sample as its UnCLIPSchedulers: DDPM)")
    variation = args.init_image is not None
    if variation and any(_given(args, o) for o in ("prompt", "prompts_file", "prior_steps", "prior_guidance")):
        raise CLIError("--init-image makes image variations (no prompt, no prior): drop --prompt, --prompts-file, "
                       "--prior-steps and --prior-guidance")
    d = DIGITS_UNCLIP_DEFAULTS if digits else UNCLIP_DEFAULTS
    for name, value in d.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    lowest = 1 if digits else 2  # UnCLIPScheduler spaces its timesteps by steps - 1
    for name in ("prior_steps", "steps") + (() if digits else ("super_res_steps",)):
        value = getattr(args, name)
        if not lowest <= value <= MAX_STEPS:
            raise CLIError(f"{_flag(name)} must be between {lowest} and {MAX_STEPS}"
                           f"{'' if digits else ' (UnCLIPScheduler spaces its timesteps by steps - 1)'}, got {value}")
    for name in ("guidance", "prior_guidance"):
        if not math.isfinite(getattr(args, name)):
            raise CLIError(f"{_flag(name)} must be a finite number, got {getattr(args, name)}")
    if args.batch < 1:
        raise CLIError(f"--batch must be at least 1, got {args.batch}")
    image = _read_image("--init-image", args.init_image, (32, 32) if digits else None) if variation else None
    prompts = None if variation else _prompts(args)
    n = args.batch if variation else len(prompts)
    _check_seeds(args.seed, 1)
    args.out = str(_output_path(args, n))
    t0 = time.perf_counter()
    if digits:
        images, small = _run_unclip_digits(args, image, prompts), None
    else:
        images, small = _run_unclip_folder(args, image, prompts)
    dt = time.perf_counter() - t0
    if variation:
        extra = dict(init_image=str(args.init_image), init_image_sha256=sha256(args.init_image), batch=args.batch)
    else:
        extra = dict(prompts=prompts, prior_steps=args.prior_steps, prior_guidance=args.prior_guidance)
    settings = _settings_png(args, dict(**extra, steps=args.steps, guidance=args.guidance,
                                        **({} if digits else {"super_res_steps": args.super_res_steps})))
    path = save_png(grid(images, pad=2) if len(images) > 1 else images[0], args.out, settings)
    if len(images) > 1:
        for i, im in enumerate(images):
            save_png(im, Path(args.out).with_name(f"{Path(args.out).stem}-{i:03d}.png"), settings)
    if small is not None:
        small = np.clip(np.asarray(small) * 0.5 + 0.5, 0.0, 1.0)
        save_png(grid(small, pad=1) if len(small) > 1 else small[0],
                 Path(args.out).with_name(f"{Path(args.out).stem}-decoder.png"), settings)
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3)}))
    return path


def _run_unclip_folder(args: argparse.Namespace, image: Any, prompts: list[str] | None) -> tuple[Any, Any]:
    """A diffusers unCLIP folder's images in [0, 1] and its decoder's low-resolution images in [-1, 1]."""
    import numpy as np

    from jaxdiff.pipelines.unclip import UnCLIP

    model = UnCLIP.from_pretrained(args.model)
    common = dict(decoder_steps=args.steps, super_res_steps=args.super_res_steps,
                  decoder_guidance_scale=args.guidance, seed=args.seed, return_stages=True)
    if image is not None:
        if model.image_encoder is None:
            raise CLIError(f"--init-image needs an image encoder: {args.model} is a text-to-image unCLIP folder; "
                           "use an UnCLIPImageVariationPipeline folder")
        images, _, small = model.variations(np.asarray(image)[None], num_images_per_prompt=args.batch, **common)
    else:
        if model.models.prior is None:
            raise CLIError(f"{args.model} has no prior (an image-variation folder): give --init-image instead of "
                           "a prompt")
        images, _, small = model(prompts, prior_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance,
                                 **common)
    return images, small


def _run_unclip_digits(args: argparse.Namespace, image: Any, prompts: list[str] | None) -> Any:
    """digits-unclip's (N, 32, 32, 3) images in [0, 1]: prompts through prior and decoder, or variations of the
    32x32 init image (seeds ``seed, seed + 1, ...``)."""
    import numpy as np

    from jaxdiff.pipelines.unclip_digits import UnCLIPDigits

    model = UnCLIPDigits.from_pretrained(model_path(args.model))
    if image is not None:
        return model.variations(np.repeat(np.asarray(image)[None], args.batch, axis=0), seed=args.seed,
                                decoder_steps=args.steps, decoder_guidance=args.guidance)
    return model(prompts, seed=args.seed, prior_steps=args.prior_steps, decoder_steps=args.steps,
                 prior_guidance=args.prior_guidance, decoder_guidance=args.guidance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Diffusion sampling in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="draw samples and write PNGs")
    _add_sample_args(p)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("edit", help="Prompt-to-Prompt: an image and its edit by another prompt (jaxdiff.editing)")
    p.add_argument("--model", default="digits-sd", help="a Stable Diffusion folder or built-in pipeline")
    p.add_argument("--prompt", required=True, help="the source prompt")
    p.add_argument("--target", required=True, help="the edited prompt (a word swapped, added or re-weighted)")
    p.add_argument("--image", default=None, metavar="PNG",
                   help="edit this real image (--prompt is its caption): invert it, then edit; NAME-source.png is "
                        "its reconstruction")
    p.add_argument("--inversion", default=None, choices=("null-text", "ddim"),
                   help="with --image: null-text inversion (Mokady et al. 2023; default) or plain DDIM inversion")
    p.add_argument("--inversion-steps", type=int, default=None, metavar="N",
                   help="with --image: DDIM steps of the inversion and of the edit; default --steps, else 50")
    p.add_argument("--height", type=int, default=None, help="image height; default the model's (with --image: "
                                                            "the image's; both --height and --width resize it)")
    p.add_argument("--width", type=int, default=None, help="image width; default as --height")
    p.add_argument("--mode", default="auto", choices=("auto", "replace", "refine"), help="word swap or refinement")
    p.add_argument("--blend", nargs="+", default=None, metavar="WORD", help="local blending on these words' maps")
    p.add_argument("--blend-threshold", type=float, nargs="+", default=[0.3], metavar="T",
                   help="local-blend threshold, or two: the --blend words' and the --blend-subtract words'; "
                        "default 0.3 (the paper's)")
    p.add_argument("--blend-subtract", nargs="+", default=None, metavar="WORD",
                   help="with --blend: take out of the mask the cells where these words' maps exceed the second "
                        "threshold (the paper's code's substruct_words; e.g. the background's word)")
    p.add_argument("--blend-start", type=float, default=0.2, metavar="F",
                   help="local blending begins after this fraction of the steps; default 0.2 (the paper's code's)")
    p.add_argument("--blend-normalize", default="max", choices=("max", "minmax"),
                   help="local-blend maps divided by their maximum (the paper's; default) or rescaled min-max (for "
                        "models whose word maps follow the object only as a bump on a uniform floor)")
    p.add_argument("--blend-composite", action="store_true",
                   help="with --blend: paste the decoded edit over the source's pixels outside the mask (a latent "
                        "model's decoder otherwise moves the background a little)")
    p.add_argument("--reweight", action="append", default=[], metavar="WORD=FACTOR", help="scale a word's maps")
    p.add_argument("--cross-steps", type=float, default=0.8, help="fraction of steps with cross-attention injection")
    p.add_argument("--self-steps", type=float, default=0.4, help="fraction of steps with self-attention injection")
    p.add_argument("--attention-maps", default=None, metavar="PNG", help="write the chosen words' maps as a grid")
    p.add_argument("--out", default="edit.png", help="the edit's PNG; the source goes beside it as NAME-source.png")
    for flag, kind, default, text in (("--steps", int, None, "sampling steps; default 20 (with --image: 50)"),
                                      ("--guidance", float, 7.5, "classifier-free guidance scale; default 7.5"),
                                      ("--seed", int, 0, "the start noise's seed; default 0"),
                                      ("--sampler", str, None, "one evaluation per step (ddim, euler, dpmpp_2m); "
                                                               "default: the folder's scheduler"),
                                      ("--negative", str, "", "negative prompt; default none")):
        p.add_argument(flag, type=kind, default=default, help=text)
    p.set_defaults(func=cmd_edit)
    p = sub.add_parser("info", help="devices, samplers, the schedules each model accepts, models; --model FOLDER "
                                    "summarises a folder")
    p.add_argument("--model", default=None, help="a diffusers folder or built-in pipeline to summarise (default: none)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="images/s of Stable Diffusion sampling (random SD-architecture weights)")
    try:
        sizes = ", ".join(f"{k} ({_bench_resolution(v)} images)" for k, v in bench_module().SIZES.items())
    except CLIError:
        sizes = "see benchmarks/throughput.py in a source checkout"
    p.add_argument("--size", default="tiny", help=f"random model size: {sizes}; ignored with --model; default tiny")
    p.add_argument("--model", default=None, help="a diffusers folder (or digits-sd) instead of random weights")
    p.add_argument("--batch", type=int, default=1, help="images per call; default 1")
    p.add_argument("--steps", type=int, default=20, help="sampling steps; default 20")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; default 7.5")
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler name; default dpmpp_2m")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first (compiling) one; default 3")
    p.add_argument("--json", default=None, help="also write the results to this file")
    _add_cpu_devices_arg(p)
    p.add_argument("--compile-cache", default=None,
                   help="persistent compilation cache folder; default $JAXDIFF_COMPILE_CACHE (off when unset)")
    p.set_defaults(func=cmd_bench)
    return parser


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print warnings as ``warning: message`` (no file, line number or source line) while the command runs."""
    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with one_line_warnings():
            if getattr(args, "cpu_devices", None) is not None:  # before any JAX computation (jaxdiff.cpu_devices)
                if args.cpu_devices < 1:
                    raise CLIError(f"--cpu-devices must be at least 1, got {args.cpu_devices}")
                from jaxdiff import cpu_devices

                cpu_devices.configure(args.cpu_devices)
            return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad names, options, paths: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---- pixel cascades (DeepFloyd IF / Imagen folders: stage_1/, stage_2/ or cascade.json) -----------------

CASCADE_DEFAULTS = dict(steps=(50, 25), guidance=(7.0, 4.0), noise_level=250, batch=1)
CASCADE_OPTIONS = ("prompt", "prompts_file", "negative", "batch", "stage_steps", "stage_guidance", "noise_level",
                   "guidance")


def cascade_defaults(folder: str | Path) -> dict:
    """Sampling defaults of a cascade folder: :data:`CASCADE_DEFAULTS` (DeepFloyd IF's) updated by the ``steps``,
    ``guidance`` and ``noise_level`` of its ``cascade.json``'s ``"sampling"`` (how the model was measured)."""
    spec = Path(folder) / "cascade.json"
    sampling = json.loads(spec.read_text()).get("sampling", {}) if spec.is_file() else {}
    if not isinstance(sampling, dict):
        raise CLIError(f"{spec}: \"sampling\" must be an object with steps, guidance and noise_level")
    out = dict(CASCADE_DEFAULTS)
    for key in ("steps", "guidance", "noise_level"):
        if key in sampling:  # a number, or a list per stage (noise levels: per later stage)
            value = sampling[key]
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _is_cascade(model: str) -> bool:
    """A built-in cascade, or a folder of IF stages: ``stage_1/`` (an IFPipeline folder) or a ``cascade.json``."""
    if model in _cascade_models():
        return True
    path = Path(model)
    return (path / "cascade.json").is_file() or (path / "stage_1" / "model_index.json").is_file()


def cascade_summary(path: str | Path) -> dict:
    """``jaxdiff info --model <cascade folder>``: each stage folder's summary, in order."""
    from jaxdiff.pipelines.deepfloyd_if import stage_folders

    return {"path": str(path), "pipeline": "cascade", "stages": [folder_summary(f) for f in stage_folders(path)]}


def _add_cascade_args(p: argparse.ArgumentParser) -> None:
    c = CASCADE_DEFAULTS
    p.add_argument("--stage-steps", default=None, metavar="N1,N2",
                   help="cascade folders: sampling steps per stage, comma-separated (one value: every stage); "
                        f"default {','.join(map(str, c['steps']))}; --steps N sets every stage")
    p.add_argument("--stage-guidance", default=None, metavar="G1,G2",
                   help="cascade folders: classifier-free guidance per stage (<= 1: none, as diffusers); default "
                        f"{','.join(f'{g:g}' for g in c['guidance'])}; --guidance G sets every stage")
    p.add_argument("--noise-level", default=None, metavar="L",
                   help="cascade folders: super-resolution stages' augmentation level, a training step in [0, 1000) "
                        f"(the low-resolution image noised to it, Imagen's noise conditioning; one value or one per "
                        f"later stage); default {c['noise_level']}")


def _stage_values(flag: str, text: Any, n: int, kind: type) -> tuple:
    """``n`` values of ``kind`` from one number, a per-stage sequence, or comma-separated text (one value: all)."""
    if isinstance(text, (int, float)):
        return (kind(text),) * n
    try:
        vals = tuple(kind(v) for v in (text if isinstance(text, (list, tuple)) else str(text).split(",")))
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated {kind.__name__}s, one per stage (e.g. 20,10), got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise CLIError(f"{flag} {text}: give one value or one per stage ({n} stages)")
    return vals


def _sample_cascade(args: argparse.Namespace) -> Path:
    """A cascade folder: every stage in one compiled program; the last stage's images as a PNG (a grid when
    several), the first stage's beside it as NAME-stage1.png."""
    import numpy as np

    from jaxdiff.images import grid, save_png
    from jaxdiff.pipelines import deepfloyd_if as IF

    if args.from_png:
        raise CLIError("--from-png does not apply to cascade folders yet; rerun with the settings the PNG records")
    what = f"cascade folder {args.model}"
    allowed = set(COMMON) - {"sampler", "schedule", "from_png"} | set(CASCADE_OPTIONS)
    _refuse_options(args, allowed, what, CASCADE_OPTIONS + ("steps", "seed", "out"),
                    " (stages sample as their schedulers: DDPM)")
    if args.steps is not None and args.stage_steps is not None:
        raise CLIError("--steps (every stage) and --stage-steps (per stage) are alternatives; give one")
    if args.guidance is not None and args.stage_guidance is not None:
        raise CLIError("--guidance (every stage) and --stage-guidance (per stage) are alternatives; give one")
    folder = model_path(args.model)
    casc = IF.IFCascade.from_pretrained(folder)
    n = len(casc.stages)
    c = cascade_defaults(folder)
    steps = _stage_values("--stage-steps", args.stage_steps or args.steps or c["steps"][:n], n, int)
    scales = _stage_values("--stage-guidance", args.stage_guidance or (args.guidance if args.guidance is not None
                                                                      else c["guidance"][:n]), n, float)
    levels = _stage_values("--noise-level", args.noise_level if args.noise_level is not None else c["noise_level"],
                           max(n - 1, 1), int)
    if any(s < 1 or s > MAX_STEPS for s in steps):
        raise CLIError(f"steps must be between 1 and {MAX_STEPS}, got {','.join(map(str, steps))}")
    if not all(math.isfinite(g) for g in scales):
        raise CLIError(f"guidance scales must be finite, got {scales}")
    if any(not 0 <= lv < 1000 for lv in levels):
        raise CLIError(f"--noise-level must be a training step in [0, 1000), got {','.join(map(str, levels))}")
    if args.batch is None:
        args.batch = c["batch"]
    prompts = _prompts(args)
    _check_seeds(args.seed, 1)
    args.out = str(_output_path(args, len(prompts)))
    t0 = time.perf_counter()
    outs = casc(prompts, steps=steps, guidance=scales, noise_level=(0,) + levels if n > 1 else levels,
                seed=args.seed, negative=args.negative)
    dt = time.perf_counter() - t0
    settings = _settings_png(args, dict(prompts=prompts, negative=args.negative, stage_steps=list(steps),
                                        stage_guidance=list(scales), noise_level=list(levels),
                                        sizes=[list(o.shape[1:3]) for o in outs]))
    final = np.asarray(outs[-1])
    path = save_png(grid(final, pad=2) if len(final) > 1 else final[0], args.out, settings)
    if len(final) > 1:
        for i, im in enumerate(final):
            save_png(im, Path(args.out).with_name(f"{Path(args.out).stem}-{i:03d}.png"), settings)
    first = np.asarray(outs[0])
    save_png(grid(first, pad=1) if len(first) > 1 else first[0],
             Path(args.out).with_name(f"{Path(args.out).stem}-stage1.png"), settings)
    print(json.dumps({"out": str(path), **settings, "seconds": round(dt, 3)}))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
