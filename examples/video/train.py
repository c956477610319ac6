"""Train digits-video: a class-conditional video diffusion model on moving digits (Ho et al. 2022), jointly on
videos and independent image frames or on videos only, and write it as a jaxdiff built-in folder.

    python examples/video/train.py --variant joint --out DIR        # the shipped model (joint image-video)
    python examples/video/train.py --variant video_only --out DIR   # the ablation at the same budget
    python examples/video/train.py --variant joint --install        # retrain and ship digits-video

The recipe is ``configs/digits_video.json``: 8-frame 16x16 clips of :func:`jaxdiff.data.load_moving_digits`
(``train`` split, 8x8 sprites, 0.5-1.5 pixels a frame), a :class:`~jaxdiff.models.video_unet.ClassVideoUNet`
(diffusers ``UNet3DConditionModel`` layout with a relative position bias in every temporal attention), epsilon
prediction on the 1000-step cosine VP schedule (Ho et al. 2020 eq. 14), labels dropped with probability 0.1
(classifier-free guidance training). ``joint`` adds ``images_per_video`` frames of *other* clips (from a pool of
clips not used as videos) to every video of the batch, trained with the temporal layers masked
(:class:`jaxdiff.train.video.JointVideoObjective`); ``video_only`` trains on the same videos, same steps, same
seed. Every step's batch, noise and dropout are functions of (seed, step): a rerun gives the same weights.

``DIR/<name>/`` gets ``model.safetensors`` (PyTorch names: ``class_embedding.weight``, ``unet.*``) and
``config.json`` (network, adapter, data, sampling and the training record). Run pinned to one core, e.g.
``taskset -c 1 python examples/video/train.py ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import builtin
from jaxdiff.convert.export import torch_state_dict
from jaxdiff.data.moving_digits import load_moving_digits
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import ddpm_loss
from jaxdiff.models.video_unet import ClassVideoUNet, ClassVideoUNetConfig
from jaxdiff.train import ArrayDataset, OptimizerConfig, Trainer, fit
from jaxdiff.train.loop import read_metrics
from jaxdiff.train.video import JointVideoObjective

CONFIG = Path(__file__).resolve().parent / "configs" / "digits_video.json"
NAMES = {"joint": "digits-video", "video_only": "digits-video-video-only"}


def load_config(path: Path = CONFIG) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def clips(data: dict[str, Any], split: str, num: int, start: int = 0) -> dict[str, np.ndarray]:
    """Clips ``start .. start + num`` of ``split`` in the recipe's format (clip ``i`` is a function of ``i``)."""
    out = load_moving_digits(split, start + num, frames=data["frames"], size=data["size"], sprite=data["sprite"],
                             speed=tuple(data["speed"]), seed=data["seed"])
    return {k: v[start:] for k, v in out.items()}


def training_arrays(cfg: dict[str, Any], images_per_video: int) -> dict[str, np.ndarray]:
    """``x`` (N, F, H, W, 1) in [-1, 1] and ``label`` (N,); with ``images_per_video = K``, ``images`` (N, K, H, W, 1)
    and ``image_label`` (N, K): random frames of pool clips ``num_videos ..`` (never used as videos), drawn once
    from ``default_rng([seed, 1])``."""
    data = cfg["data"]
    videos = clips(data, "train", data["num_videos"])
    arrays = {"x": videos["video"] * 2.0 - 1.0, "label": videos["label"]}
    if images_per_video:
        pool = clips(data, "train", data["image_pool"], start=data["num_videos"])
        rng = np.random.default_rng([data["seed"], 1])
        n = data["num_videos"]
        which = rng.integers(data["image_pool"], size=(n, images_per_video))
        frame = rng.integers(data["frames"], size=(n, images_per_video))
        arrays["images"] = pool["video"][which, frame] * 2.0 - 1.0
        arrays["image_label"] = pool["label"][which]
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def make_objective(cfg: dict[str, Any], images_per_video: int) -> JointVideoObjective:
    ac = jnp.asarray(builtin.vp_alphas_cumprod(cfg["adapter"]))
    t = cfg["train"]
    return JointVideoObjective(ddpm_loss(ac), DiscreteVPDenoiser(None, ac, cfg["adapter"]["prediction"]),
                               label_dropout=t["label_dropout"], image_weight=t["image_weight"],
                               images_per_video=images_per_video, null_label=cfg["adapter"]["null_label"])


def train(cfg: dict[str, Any], variant: str, *, steps: int | None = None, workdir: Path | None = None,
          progress: bool = True) -> tuple[nnx.Module, dict[str, Any]]:
    """Train one variant; returns the EMA network and the training record."""
    if variant not in cfg["variants"]:
        raise ValueError(f"unknown variant {variant!r}; valid: {sorted(cfg['variants'])}")
    t = cfg["train"]
    k = cfg["variants"][variant]["images_per_video"]
    steps = steps or t["steps"]
    t0 = time.perf_counter()
    arrays = training_arrays(cfg, k)
    data_seconds = time.perf_counter() - t0
    opt = {**cfg["optimizer"], "total_steps": steps}
    opt["warmup_steps"] = min(opt["warmup_steps"], steps // 10)
    model = ClassVideoUNet(ClassVideoUNetConfig.from_dict(cfg["network"]), rngs=nnx.Rngs(t["seed"]))
    trainer, state = Trainer.create(model, make_objective(cfg, k), OptimizerConfig(**opt),
                                    sample_shape=arrays["x"].shape[1:], seed=t["seed"], ema_decay=t["ema_decay"],
                                    ema_warmup=True)
    dataset = ArrayDataset(arrays, batch_size=t["batch_size"], seed=t["seed"])
    workdir = Path(workdir or f"/tmp/jaxdiff-video/{variant}")
    t1 = time.perf_counter()
    state = fit(trainer, state, dataset, steps, workdir=workdir, checkpoint_every=500, log_every=25,
                model_config=cfg["network"], progress=progress)
    metrics = read_metrics(workdir / "metrics.jsonl")
    rates = [m["steps_per_s"] for m in metrics if m["step"] > 50]
    record = {"variant": variant, "images_per_video": k, "steps": steps, "batch_size": t["batch_size"],
              "videos": int(arrays["x"].shape[0]), "frames_per_step": t["batch_size"] * (cfg["data"]["frames"] + k),
              "data_seconds": round(data_seconds, 1), "seconds": round(time.perf_counter() - t1, 1),
              "steps_per_s": round(float(np.median(rates)), 2) if rates else None,
              "final_loss": round(float(np.mean([m["loss"] for m in metrics[-40:]])), 5),
              "final_video_loss": round(float(np.mean([m["video_loss"] for m in metrics[-40:]])), 5),
              "loss_trace": [[m["step"], round(m["loss"], 5)] for m in metrics if m["step"] % 100 == 0],
              "load_average": [round(v, 2) for v in os.getloadavg()]}
    return trainer.model(state).module(), record


def save(cfg: dict[str, Any], module: nnx.Module, record: dict[str, Any], folder: Path) -> Path:
    """Write ``folder/model.safetensors`` (float32, PyTorch names) and ``folder/config.json``."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(torch_state_dict(module, dtype=np.float32), str(folder / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(folder / "model.safetensors", 0o644)
    meta = {k: cfg[k] for k in ("network", "adapter", "data", "sampling")}
    meta["training"] = {"data": "jaxdiff.data.load_moving_digits('train', ...) with the data settings above "
                                "(videos: clips 0..num_videos-1; image frames: clips num_videos.. of the same split)",
                        "script": f"examples/video/train.py --variant {record['variant']}",
                        "recipe": {k: cfg[k] for k in ("train", "optimizer")}, **record}
    (folder / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="joint", help="joint (image-video, shipped) or video_only (the ablation)")
    p.add_argument("--out", type=Path, default=Path("/tmp/jaxdiff-video/out"), help="folder for <name>/")
    p.add_argument("--install", action="store_true", help=f"write into {builtin.ASSETS} (the shipped built-in)")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (trials)")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints and metrics (resumes from them)")
    p.add_argument("--config", type=Path, default=CONFIG)
    args = p.parse_args()
    cfg = load_config(args.config)
    module, record = train(cfg, args.variant, steps=args.steps, workdir=args.workdir)
    folder = save(cfg, module, record, (builtin.ASSETS if args.install else args.out) / NAMES[args.variant])
    print(folder, json.dumps({k: v for k, v in record.items() if k != "loss_trace"}))


if __name__ == "__main__":
    main()
