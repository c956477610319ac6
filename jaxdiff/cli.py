"""The ``jaxdiff`` command line: ``jaxdiff sample``, ``jaxdiff info``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

BUILTIN_MODELS = ("mixture2d",)


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixture2d", help=f"model name ({', '.join(BUILTIN_MODELS)}); default mixture2d")
    p.add_argument("--sampler", default="euler", help="sampler name (see `jaxdiff info`)")
    p.add_argument("--schedule", default="karras", help="schedule name (see `jaxdiff info`)")
    p.add_argument("--steps", type=int, default=30, help="number of sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=2000, help="number of samples")
    p.add_argument("--label", type=int, default=None, help="class label to sample (default: unconditional)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (with --label)")
    p.add_argument("--out", default="samples.png", help="output PNG path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _sample_mixture(args: argparse.Namespace) -> Path:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import guidance, mixtures, sampling, schedules
    from jaxdiff.samplers import get_sampler
    from jaxdiff.plotting import scatter_png

    mix = mixtures.ring_2d()
    sampler = get_sampler(args.sampler)
    make = schedules.get_schedule(args.schedule)
    if args.steps <= 0:
        raise SystemExit(f"error: --steps must be positive, got {args.steps}")
    sigmas = make(args.steps, 0.01, 40.0, capacity=max(args.steps, 1000)) if args.schedule in (
        "karras", "exponential", "linear", "ncsn_geometric") else make(args.steps, capacity=max(args.steps, 1000))
    key = jax.random.key(args.seed)
    x = sampling.initial_noise(jax.random.fold_in(key, 1), (args.num, 2), sigmas.values[0], sigma_data=4.0)
    denoiser, cond = mix, None
    if args.label is not None:
        if not 0 <= args.label < mix.num_classes:
            raise SystemExit(f"error: --label must be in [0, {mix.num_classes}), got {args.label}")
        cond = jnp.full((args.num,), args.label, jnp.int32)
        denoiser = guidance.classifier_free(args.guidance, jnp.full((args.num,), mixtures.UNCONDITIONAL))(mix)
    t0 = time.perf_counter()
    out = sampling.sample(denoiser, sampler, sigmas, x, key, cond, progress=not args.no_progress)
    out = np.asarray(out)
    dt = time.perf_counter() - t0
    ref = np.asarray(mix.sample(jax.random.fold_in(key, 2), args.num,
                                None if args.label is None else np.full((args.num,), args.label)))
    title = f"{args.sampler}, {args.schedule}, {args.steps} steps" + ("" if args.label is None else f", class {args.label}")
    path = scatter_png(out, ref, args.out, title)
    print(json.dumps({"out": str(path), "model": args.model, "sampler": args.sampler, "steps": args.steps,
                      "seed": args.seed, "seconds": round(dt, 3)}))
    return path


def cmd_sample(args: argparse.Namespace) -> int:
    if args.model not in BUILTIN_MODELS:
        raise SystemExit(f"error: unknown model {args.model!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    _sample_mixture(args)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import jax

    from jaxdiff.samplers import SAMPLERS
    from jaxdiff.schedules import SCHEDULES

    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "samplers": sorted(SAMPLERS),
        "schedules": sorted(SCHEDULES),
        "models": list(BUILTIN_MODELS),
    }
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Diffusion sampling in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="draw samples and write a PNG")
    _add_sample_args(p)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("info", help="devices, samplers, schedules and models")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad names or options: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
