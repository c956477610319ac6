"""Train class-conditional DiTs (Peebles & Xie 2023) on scikit-learn's 8x8 digits, in pixels with patches.

    python examples/dit/train.py                      # every run of RUNS, in order (about 40 min on one core)
    python examples/dit/train.py dit-s2 --steps 200   # one run, a quick trial
    python examples/dit/train.py --install dit-b1     # copy a finished run into jaxdiff/assets/digits/digits-dit

Three sizes / patch sizes spanning about 10x in forward Gflops (``dit-s2``, ``dit-s1``, ``dit-b1``) with adaLN-Zero,
and at the smallest size the paper's conditioning ablation (``dit-s2-cross``: cross-attention; ``dit-s2-incontext``:
in-context tokens). Every run has the same budget: ``STEPS`` AdamW steps of ``BATCH`` digits (the 1,500 training
digits of :func:`jaxdiff.train.load_digits_dataset`), the same seed, learning-rate schedule, EMA and label dropout
(10 %, for classifier-free guidance). Epsilon prediction on the 1000-step cosine VP schedule, as the built-in
``digits``. Pin the process to one core (``taskset -c 0``) and the run is deterministic.

Each run writes a pipeline folder (``model_index.json``, ``transformer/`` in diffusers' ``DiTTransformer2DModel``
layout, ``scheduler/``, ``training.json``) under ``examples/dit/weights/<run>/`` in float16 (``--out``; what
``benchmarks/dit_scaling.py`` evaluates; the built-in is the float32 original) and resumes from
``/tmp/jaxdiff-dit/<run>`` (``--work``; ``--fresh`` starts over).
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
from jaxdiff.denoisers import DiscreteVPDenoiser  # noqa: E402
from jaxdiff.models.dit import DiTConfig, DiTTransformer2DModel, dit_init  # noqa: E402
from jaxdiff.train import (ArrayDataset, DiffusionObjective, OptimizerConfig, Trainer, fit,  # noqa: E402
                           load_digits_dataset, read_metrics)

WEIGHTS = Path(__file__).resolve().parent / "weights"
WORK = Path("/tmp/jaxdiff-dit")
STEPS, BATCH, SEED, LR, EMA, DROPOUT = 3000, 64, 0, 1e-3, 0.999, 0.1

_BASE = dict(in_channels=1, sample_size=8, num_embeds_ada_norm=10, attention_bias=True,
             activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False,
             norm_eps=1e-5)
RUNS: dict[str, dict[str, Any]] = {
    # name: (width = heads x head_dim, depth, patch); S: 64 wide, 4 blocks; B: 80 wide, 6 blocks
    "dit-s2": dict(num_attention_heads=4, attention_head_dim=16, num_layers=4, patch_size=2),
    "dit-s2-cross": dict(num_attention_heads=4, attention_head_dim=16, num_layers=4, patch_size=2,
                         conditioning="cross_attention"),
    "dit-s2-incontext": dict(num_attention_heads=4, attention_head_dim=16, num_layers=4, patch_size=2,
                             conditioning="in_context"),
    "dit-s1": dict(num_attention_heads=4, attention_head_dim=16, num_layers=4, patch_size=1),
    "dit-b1": dict(num_attention_heads=4, attention_head_dim=20, num_layers=6, patch_size=1),
}
SIZES = ("dit-s2", "dit-s1", "dit-b1")
ABLATION = ("dit-s2", "dit-s2-cross", "dit-s2-incontext")
ADAPTER = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "prediction": "epsilon",
           "null_label": 10}
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.0",
             "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
             "algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"}
SAMPLING = {"sampler": "dpmpp_2m", "schedule": "karras", "steps": 20, "guidance": 3.0, "sigma_max": 80.0}
DATA = "sklearn load_digits: the 1500-image train split of jaxdiff.train.load_digits_dataset(), 8x8 in [-1, 1]"


def network_config(name: str) -> dict[str, Any]:
    """The transformer's ``config.json`` (diffusers keys; ``conditioning`` only when it is not adaLN-Zero)."""
    if name not in RUNS:
        raise SystemExit(f"unknown run {name!r}; valid: {', '.join(RUNS)}")
    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": "0.42.0", **_BASE, **RUNS[name],
            "out_channels": 1}


def build(name: str) -> DiTTransformer2DModel:
    cfg = DiTConfig.from_dict(network_config(name))
    return dit_init(DiTTransformer2DModel(cfg, rngs=nnx.Rngs(SEED)), SEED)


def objective() -> DiffusionObjective:
    ac = jnp.asarray(builtin.vp_alphas_cumprod(ADAPTER))
    return DiffusionObjective(L.ddpm_loss(ac), DiscreteVPDenoiser(None, ac, "epsilon"), label_dropout=DROPOUT,
                              conditional=True, null_label=ADAPTER["null_label"])


def write_folder(folder: Path, name: str, module: nnx.Module, record: dict, dtype: Any) -> Path:
    """A DiT pipeline folder (no VAE: the model works in pixels) with the weights in ``dtype``."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "transformer").mkdir(exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file(torch_state_dict(module, dtype=dtype), str(weights), metadata={"format": "pt"})
    cfg = network_config(name)
    if cfg.get("conditioning", "ada_norm_zero") == "ada_norm_zero":
        cfg.pop("conditioning", None)
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1) + "\n")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.42.0",
             "id2label": {str(i): str(i) for i in range(10)},
             "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", SCHEDULER["_class_name"]], "vae": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    (folder / "training.json").write_text(json.dumps({**record, "sampling": SAMPLING}, indent=1) + "\n")
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return folder


def train(name: str, steps: int = STEPS, fresh: bool = False, progress: bool = True, out: Path = WEIGHTS,
          work: Path = WORK) -> dict:
    """Train one run and write its folder (float16) under ``out``; returns the training record."""
    workdir = Path(work) / name
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    data_train, _ = load_digits_dataset()
    model = build(name)
    params = sum(int(np.prod(v.shape)) for v in jax_leaves(nnx.state(model, nnx.Param)))
    opt = OptimizerConfig(learning_rate=LR, warmup_steps=min(200, steps // 10), total_steps=steps)
    record: dict[str, Any] = {"run": name, "data": DATA, "script": f"examples/dit/train.py {name}", "steps": steps, "batch_size": BATCH, "learning_rate": LR, "ema_decay": EMA,
                              "label_dropout": DROPOUT, "seed": SEED, "parameters": params,
                              "train_images": len(data_train["x"]), "load_before": _load(),
                              "affinity": sorted(os.sched_getaffinity(0))}
    t0 = time.perf_counter()
    trainer, state = Trainer.create(model, objective(), opt, sample_shape=(8, 8, 1), seed=SEED, ema_decay=EMA,
                                    ema_warmup=True)
    data = ArrayDataset(data_train, batch_size=BATCH, seed=SEED)
    state = fit(trainer, state, data, steps, workdir=workdir, checkpoint_every=500, log_every=50,
                model_config=network_config(name), progress=progress)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    metrics = read_metrics(workdir / "metrics.jsonl")
    rates = [m["steps_per_s"] for m in metrics if m["step"] > 100]
    record["steps_per_s"] = round(float(np.median(rates)), 2) if rates else None
    record["final_loss"] = round(float(np.mean([m["loss"] for m in metrics[-20:]])), 5)
    record["load_after"] = _load()
    module = trainer.model(state).module()
    write_folder(workdir / "folder", name, module, record, np.float32)
    write_folder(Path(out) / name, name, module, record, np.float16)
    return record


def install(name: str, work: Path = WORK) -> Path:
    """Copy a finished run's float32 folder into the package as the built-in ``digits-dit``."""
    src = Path(work) / name / "folder"
    if not src.is_dir():
        raise SystemExit(f"{src} does not exist: train {name} first")
    dst = builtin.ASSETS / "digits-dit"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    rec = json.loads((dst / "training.json").read_text())
    rec["script"] = f"examples/dit/train.py {name} && examples/dit/train.py --install {name}"
    (dst / "training.json").write_text(json.dumps(rec, indent=1) + "\n")
    return dst


def jax_leaves(tree: Any) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", default=list(RUNS), help=f"runs to train (default: all of {list(RUNS)})")
    p.add_argument("--steps", type=int, default=STEPS, help="steps per run (the budget; the same for every run)")
    p.add_argument("--fresh", action="store_true", help="delete earlier checkpoints first")
    p.add_argument("--install", metavar="RUN", default=None, help="install RUN's folder as the built-in digits-dit")
    p.add_argument("--out", type=Path, default=WEIGHTS, help="where the float16 run folders go")
    p.add_argument("--work", type=Path, default=WORK, help="checkpoints and the float32 folders (resumed from)")
    args = p.parse_args()
    if args.install:
        print(install(args.install, args.work))
        return
    for name in args.runs:
        network_config(name)
    for name in args.runs:
        print(name, json.dumps(train(name, args.steps, args.fresh, out=args.out, work=args.work)), flush=True)


if __name__ == "__main__":
    main()
