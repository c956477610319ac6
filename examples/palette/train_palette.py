"""Train Palette (Saharia et al. 2022) on 8x8 digits, with the paper's baselines, and write ``digits-palette``.

    python examples/palette/train_palette.py                       # all three runs into jaxdiff/assets/digits/
    python examples/palette/train_palette.py regression --steps 200 --out /tmp/pal   # a quick trial elsewhere

One multi-task model: every training digit (the 1,500 of ``jaxdiff.train.load_digits_dataset``'s train split)
is degraded ``data.copies`` times, each copy by a task drawn at random (:func:`jaxdiff.data.degradations.task_pairs`:
inpainting a random 3-5 pixel box, uncropping half the image, blur + noise, JPEG at quality 5-20), the masked
pixels filled with Gaussian noise as the paper; the task is implied by the source only. The runs of
``palette.json`` (same network, same data, same steps):

- ``diffusion_l2``: Palette's loss with p = 2 (the paper's default; shipped as ``model.safetensors``, float32);
- ``diffusion_l1``: the same with p = 1 (``diffusion_l1.safetensors``, float16);
- ``regression``: the network as an L2 regressor of the target on the source (``regression.safetensors``, float16).

The 8x8 format is the data's own and the ``digits-eval`` judge's (an upsampled copy adds no information and costs
4x per step on two shared cores). Runs resume from ``/tmp/jaxdiff-palette/<run>`` (``--fresh`` starts over). The
training records (seconds, steps/s, final loss, load average) land in the folder's ``config.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jaxdiff import builtin, losses as L  # noqa: E402
from jaxdiff.convert.export import torch_state_dict  # noqa: E402
from jaxdiff.data.degradations import DEFAULTS, task_pairs  # noqa: E402
from jaxdiff.denoisers import DiscreteVPDenoiser  # noqa: E402
from jaxdiff.models.unet2d import UNet2DConfig, UNet2DModel  # noqa: E402
from jaxdiff.pipelines.palette import WEIGHTS, _alphas_cumprod  # noqa: E402
from jaxdiff.train import ArrayDataset, OptimizerConfig, Trainer, fit, load_digits_dataset, read_metrics  # noqa: E402
from jaxdiff.train.palette import PaletteObjective, RegressionObjective  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "palette.json"
NAME = "digits-palette"


def load_config(path: Path = CONFIG) -> dict:
    return json.loads(Path(path).read_text())


def objective(cfg: dict, run: str) -> Any:
    """The objective of one run of the config (``diffusion`` with its norm, or ``regression``)."""
    spec = cfg["runs"][run]
    if spec["objective"] == "regression":
        return RegressionObjective()
    ac = jnp.asarray(_alphas_cumprod(cfg["adapter"]), jnp.float32)
    return PaletteObjective(L.DiscreteVPLevels(ac), DiscreteVPDenoiser(None, ac, cfg["adapter"]["prediction"]),
                            spec["norm"])


def training_pairs(cfg: dict) -> dict[str, np.ndarray]:
    """The degraded copies of the training digits (deterministic in the config's data seed)."""
    train, _ = load_digits_dataset()
    d = cfg["data"]
    return task_pairs(train["x"], d["copies"], d["seed"], tuple(d["tasks"]))


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def train_run(cfg: dict, run: str, pairs: dict, steps: int | None = None, workdir: Path | None = None,
              progress: bool = True) -> tuple[nnx.Module, dict]:
    """Train one run; returns the EMA network and its training record."""
    t = cfg["train"]
    steps = steps or t["steps"]
    opt = dict(cfg["optimizer"], total_steps=steps)
    opt["warmup_steps"] = min(opt["warmup_steps"], steps // 10)
    record: dict[str, Any] = {"steps": steps, "batch_size": t["batch_size"], "pairs": len(pairs["x"]),
                              "load_before": load_average()}
    t0 = time.perf_counter()
    net = UNet2DModel(UNet2DConfig.from_dict(cfg["network"]), rngs=nnx.Rngs(t["seed"]))
    trainer, state = Trainer.create(net, objective(cfg, run), OptimizerConfig(**opt), sample_shape=pairs["x"].shape[1:],
                                    seed=t["seed"], ema_decay=t["ema_decay"], ema_warmup=True)
    data = ArrayDataset({"x": pairs["x"], "source": pairs["source"]}, batch_size=t["batch_size"], seed=t["seed"])
    workdir = Path(workdir or f"/tmp/jaxdiff-palette/{run}")
    state = fit(trainer, state, data, steps, workdir=workdir, checkpoint_every=1000, log_every=50,
                model_config={**cfg["network"], "run": run}, progress=progress)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    metrics = read_metrics(workdir / "metrics.jsonl")
    rates = [m["steps_per_s"] for m in metrics if m["step"] > 100]
    record["steps_per_s"] = round(float(np.median(rates)), 2) if rates else None
    record["final_loss"] = round(float(np.mean([m["loss"] for m in metrics[-20:]])), 5)
    record["load_after"] = load_average()
    return trainer.model(state).module(), record


def save(folder: Path, cfg: dict, run: str, module: nnx.Module, record: dict) -> None:
    """Write the run's weights (the shipped run in float32, baselines in float16) and update ``config.json``."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    variant = "diffusion_l2" if run == cfg["ship"] else run
    dtype = np.float32 if run == cfg["ship"] else np.float16
    path = folder / WEIGHTS[variant]
    save_file(torch_state_dict(module, dtype=dtype), str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)
    cfg_path = folder / "config.json"
    meta = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    meta.update({k: cfg[k] for k in ("network", "adapter", "sampling")})
    meta["degradations"] = {"tasks": cfg["data"]["tasks"], **DEFAULTS}
    meta.setdefault("training", {})
    meta["training"].update(data=f"sklearn load_digits: the 1500-image train split of "
                                 f"jaxdiff.train.load_digits_dataset(), {cfg['data']['copies']} degraded copies each",
                            script="examples/palette/train_palette.py", config=cfg["runs"])
    meta["training"][run] = {**record, "file": path.name}
    cfg_path.write_text(json.dumps(meta, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", default=None, help="runs of the config to train (default: all)")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (trials)")
    p.add_argument("--out", type=Path, default=builtin.ASSETS, help="where the digits-palette folder goes")
    p.add_argument("--fresh", action="store_true", help="delete earlier checkpoints first")
    args = p.parse_args()
    cfg = load_config(args.config)
    runs = args.runs or list(cfg["runs"])
    for run in runs:
        if run not in cfg["runs"]:
            raise SystemExit(f"unknown run {run!r}; valid: {', '.join(cfg['runs'])}")
    pairs = training_pairs(cfg)
    for run in runs:
        workdir = Path(f"/tmp/jaxdiff-palette/{run}" + (f"-{args.steps}" if args.steps else ""))
        if args.fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        module, record = train_run(cfg, run, pairs, args.steps, workdir)
        save(args.out / NAME, cfg, run, module, record)
        print(run, json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
