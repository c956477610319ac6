"""Train digits-controlnet and digits-adapter: a ControlNet and a T2I-Adapter that make the built-in digits-sd
follow a digit's edge map, and write them as diffusers ``ControlNetModel`` / ``T2IAdapter`` folders.

    python examples/digits_sd/train_control.py --out DIR [--sides controlnet,adapter] [--install]

Both read the Canny edge map of a digit's ink (:func:`jaxdiff.control_images.digit_edges`, as a white-on-black
RGB control image) and train beside the frozen digits-sd U-Net on its own denoising loss
(:class:`jaxdiff.train.control.ControlObjective`), on the 6,000 captioned training digits only:

- ``controlnet`` (Zhang et al. 2023): a trainable copy of the U-Net's encoder (``controlnet_from_unet``), joined by
  zero-initialised 1x1 convolutions, with a small convolutional encoder of the control image; half the captions
  are replaced by the empty prompt (the paper's 50%), so the control image alone must explain the layout.
- ``adapter`` (Mou et al. 2023): a ``full_adapter`` T2I-Adapter whose features are added inside the U-Net's down
  blocks, trained with the paper's cubic timestep sampling (more weight on early, noisy steps).

Every ``eval_every`` steps the edge F1 on held-out control maps is measured (``curve``): the paper reports a
"sudden convergence", the step where the model abruptly starts to follow the control. ``DIR/<side>/`` gets the
folder, ``DIR/control_training.json`` the recipes, times, loss traces and curves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train as sd_train  # noqa: E402  (recipe loading, the fit wrapper, the judge)
from benchmarks.control_quality import edge_controls, edge_f1, eval_pairs, generate, side_transform  # noqa: E402

from jaxdiff import builtin  # noqa: E402
from jaxdiff.control_images import digit_edges  # noqa: E402
from jaxdiff.convert.export import save_pretrained  # noqa: E402
from jaxdiff.data import load_digits_text  # noqa: E402
from jaxdiff.denoisers import DiscreteVPDenoiser  # noqa: E402
from jaxdiff.losses import cubic_ddpm_loss, ddpm_loss  # noqa: E402
from jaxdiff.models.controlnet import controlnet_from_unet  # noqa: E402
from jaxdiff.models.t2i_adapter import T2IAdapter, T2IAdapterConfig  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402
from jaxdiff.train import ArrayDataset, Trainer  # noqa: E402
from jaxdiff.train.control import ControlObjective  # noqa: E402

SIDES = ("controlnet", "adapter")
ASSETS = sd_train.ASSETS
INSTALLED = {"controlnet": "digits-controlnet", "adapter": "digits-adapter"}
UNET_ONLY_KEYS = ("attention_type", "center_input_sample", "class_embeddings_concat", "conv_in_kernel",
                  "conv_out_kernel", "dual_cross_attention", "out_channels", "sample_size", "time_cond_proj_dim",
                  "time_embedding_act_fn", "time_embedding_dim", "time_embedding_type", "timestep_post_act",
                  "up_block_types")
"""Keys of jaxdiff's ControlNet config (copied from the U-Net's) that diffusers' ``ControlNetModel`` does not take."""


# ------------------------------------------------------------------------------------------------ data

def _chunked_jit(fn: Any, *arrays: np.ndarray, chunk: int = 256) -> np.ndarray:
    jitted = jax.jit(fn)
    n = len(arrays[0])
    return np.concatenate([np.asarray(jitted(*(jnp.asarray(a[i:i + chunk]) for a in arrays)))
                           for i in range(0, n, chunk)])


def control_data(sd: StableDiffusion, split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The training batch entries, computed once: scaled latents (the VAE posterior means, as digits-sd's U-Net
    trained), caption states, control images; and the empty prompt's states."""
    m = sd.models
    pixels = sd_train.to_pixels(split["image"])
    latents = _chunked_jit(lambda x: m.to_latent(m.encode_image(x)[0]), pixels)
    context = _chunked_jit(m.encode_text, sd.tokenize([str(c) for c in split["caption"]]))
    null = np.asarray(m.encode_text(jnp.asarray(sd.tokenize([""]))))[0]
    return {"x": latents.astype(np.float32), "context": context.astype(np.float32),
            "control": edge_controls(split["image"])[1], "null": null}


# ------------------------------------------------------------------------------------------ the sides

def build_side(side: str, cfg: dict[str, Any], sd: StableDiffusion) -> nnx.Module:
    """A new ControlNet copying digits-sd's encoder, or a new T2I-Adapter for its down blocks."""
    rngs = nnx.Rngs(cfg["seed"])
    if side == "controlnet":
        return controlnet_from_unet(sd.models.unet.module(), rngs=rngs,
                                    conditioning_embedding_out_channels=tuple(cfg["conditioning_embedding_out_channels"]))
    return T2IAdapter(T2IAdapterConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in cfg["model"].items()}), rngs=rngs)


def fit_with_curve(trainer: Trainer, state: Any, dataset: ArrayDataset, steps: int, every: int, measure: Any,
                   progress: bool) -> tuple[Any, dict[str, Any]]:
    """``fit`` in segments of ``every`` steps with ``measure(step, state)`` after each (the loss trace as _fit)."""
    trace: list[list[float]] = []
    seconds = 0.0
    done = 0
    while done < steps:
        target = min(done + every, steps)
        start = time.perf_counter()
        state, rec = sd_train._fit(trainer, state, dataset, target, progress)
        seconds += time.perf_counter() - start
        trace += [p for p in rec["loss_trace"] if p[0] > done]
        done = target
        measure(done, state)
    return state, {"steps": steps, "batch_size": dataset.batch_size, "train_seconds": round(seconds, 1),
                   "steps_per_s": round(steps / max(seconds, 1e-9), 2),
                   "epochs": round(steps * dataset.batch_size / dataset.num_examples, 2), "loss_trace": trace}


def run_side(side: str, cfg: dict[str, Any], sd: StableDiffusion, data: dict[str, np.ndarray],
             pairs: dict[str, Any], out: Path, *, steps: int | None, progress: bool) -> dict[str, Any]:
    """Train, measure the curve, save ``out/<side>`` (a diffusers folder)."""
    steps = cfg["steps"] if steps is None else steps
    ac = jnp.asarray(sd.train.alphas_cumprod, jnp.float32)
    loss = cubic_ddpm_loss(ac) if cfg.get("cubic_timesteps") else ddpm_loss(ac)
    objective = ControlObjective(loss, DiscreteVPDenoiser(None, ac, "epsilon"), sd.models.unet,
                                 jnp.asarray(data["null"]), cfg["context_dropout"], side)
    model = build_side(side, cfg, sd)
    params = sd_train._count(model)
    trainer, state = Trainer.create(model, objective, sd_train._optimizer(cfg, steps),
                                    sample_shape=data["x"].shape[1:], seed=cfg["seed"], ema_decay=0.0)
    dataset = ArrayDataset({k: data[k] for k in ("x", "context", "control")},
                           batch_size=min(cfg["batch_size"], len(data["x"])), seed=cfg["seed"])
    curve: list[dict[str, float]] = []
    look = dict(guidance=cfg["eval_guidance"], steps=cfg["eval_steps"])

    def measure(step: int, st: Any) -> None:
        net = trainer.model(st, ema=False)
        edges = np.asarray(digit_edges(generate(sd, pairs, lambda c: side_transform(side, net, c), **look)))
        curve.append({"step": step, "edge_f1": round(float(edge_f1(edges, pairs["edges"]).mean()), 4),
                      "edge_f1_exact": round(float(edge_f1(edges, pairs["edges"], 0).mean()), 4)})
        print(f"[{side}] step {step}: {curve[-1]}", file=sys.stderr, flush=True)

    measure(0, state)
    state, record = fit_with_curve(trainer, state, dataset, steps, int(cfg["eval_every"]), measure, progress)
    trained = nnx.merge(trainer.graphdef, state.params, state.buffers)
    folder = out / side
    if folder.exists():
        shutil.rmtree(folder)
    class_name = "ControlNetModel" if side == "controlnet" else "T2IAdapter"
    config = {k: v for k, v in dataclasses.asdict(trained.config).items() if k not in UNET_ONLY_KEYS}
    save_pretrained(trained, folder, config, class_name=class_name, library="diffusers")
    return {"recipe": cfg, "parameters": params, **record, "curve": curve,
            "curve_eval": {"pairs": len(pairs["prompts"]), **look}, "folder": str(folder),
            "megabytes": sd_train.folder_megabytes(folder)}


# ----------------------------------------------------------------------------------------------- main

def parse_sides(text: str) -> tuple[str, ...]:
    sides = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise ValueError(f"unknown sides {bad}; valid: {', '.join(SIDES)}")
    return tuple(s for s in SIDES if s in sides)


def run(out: str | os.PathLike, sides: tuple[str, ...] = SIDES, *, model: str | os.PathLike = "digits-sd",
        steps: dict[str, int] | None = None, configs: dict[str, dict[str, Any]] | None = None,
        progress: bool = True, eval_num: int | None = None) -> dict[str, Any]:
    """Train ``sides`` for ``model`` (a built-in name or a folder) into ``out``; returns the training record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, configs = steps or {}, configs or {}
    sd = builtin.load_pipeline(str(model)) if str(model) in builtin.BUILTIN_PIPELINES else \
        StableDiffusion.from_pretrained(model)
    sets = load_digits_text()
    log_path = out / "control_training.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    start = time.perf_counter()
    data = control_data(sd, sets["train"])
    log["data"] = {"train_examples": len(data["x"]), "seconds": round(time.perf_counter() - start, 1)}
    for side in sides:
        cfg = configs.get(side) or sd_train.load_config(side)
        pairs = eval_pairs(sets["held_out"], eval_num or cfg["eval_num"])
        start = time.perf_counter()
        rec = run_side(side, cfg, sd, data, pairs, out, steps=steps.get(side), progress=progress)
        log[side] = {"seconds": round(time.perf_counter() - start, 1), **rec, "cpu_count": os.cpu_count(),
                     "jax_backend": jax.default_backend()}
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    return log


def install(out: Path, assets: Path = ASSETS) -> list[Path]:
    """Copy ``out/controlnet`` and ``out/adapter`` over the package's digits-controlnet and digits-adapter (with
    ``control_training.json``: the curve the quality benchmark reports)."""
    targets = []
    for side, name in INSTALLED.items():
        source, target = Path(out) / side, Path(assets) / name
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is missing: train both sides before --install")
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        shutil.copy2(Path(out) / "control_training.json", target / "training.json")
        targets.append(target)
    return targets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (the side networks, control_training.json)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of controlnet,adapter")
    p.add_argument("--model", default="digits-sd", help="the base model: a built-in name or a diffusers SD folder")
    for s in SIDES:
        p.add_argument(f"--{s}-steps", type=int, default=None, help=f"{s} training steps (default: the recipe's)")
    p.add_argument("--eval-num", type=int, default=None, help="held-out pairs measured for the curve")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--install", action="store_true",
                   help="afterwards, replace the package's digits-controlnet and digits-adapter with DIR's")
    args = p.parse_args(argv)
    steps = {s: getattr(args, f"{s}_steps") for s in SIDES if getattr(args, f"{s}_steps") is not None}
    if args.install and (steps or args.eval_num or set(parse_sides(args.sides)) != set(SIDES)
                         or args.model != "digits-sd"):
        p.error("--install ships a full run of both recipes on digits-sd: drop --sides, --model and the step options")
    log = run(args.out, parse_sides(args.sides), model=args.model, steps=steps, progress=not args.no_progress,
              eval_num=args.eval_num)
    if args.install:
        log["installed"] = {p.name: str(p) for p in install(args.out)}
    summary = {k: {m: v for m, v in rec.items() if not isinstance(v, (dict, list))} for k, rec in log.items()}
    print(json.dumps(summary, indent=1))
    return log


if __name__ == "__main__":
    main()
