"""Teach digits-sd a style it never drew (hollow, outlined strokes) three ways: a LoRA, a textual-inversion token and a
hypernetwork, each trained with optax beside the frozen model; write the three files the formats people share.

    python examples/digits_sd/train_personal.py --out DIR [--methods lora,textual_inversion,hypernetwork] [--install]

The concept set (:func:`benchmarks.personalisation.concept_set`): 200 training digits (held-out digits never used)
redrawn as outlines by a fixed transform, with their captions: as they are for the LoRA and the hypernetwork (both act
on every prompt once loaded), with a new token appended for textual inversion (``"... <outline>"``). ``DIR`` gets
``outline_lora.safetensors`` (kohya format), ``outline_embedding.safetensors`` (diffusers' ``learned_embeds``),
``outline_hypernetwork.safetensors`` and ``training.json`` (recipes, times, parameter counts,
loss traces); ``--install`` copies them to ``jaxdiff/assets/digits/digits-outline/``, which
``benchmarks/personalisation.py`` evaluates.
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

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.personalisation import FILES, TOKEN, concept_set, with_token  # noqa: E402

from jaxdiff import builtin  # noqa: E402
from jaxdiff import textual_inversion as ti  # noqa: E402
from jaxdiff.convert.lora_export import save_lora  # noqa: E402
from jaxdiff.data import load_digits_text  # noqa: E402
from jaxdiff.models import hypernetwork as hnet  # noqa: E402
from jaxdiff.train import ArrayDataset, OptimizerConfig, fit  # noqa: E402
from jaxdiff.train.lora import lora_trainer, trained_lora  # noqa: E402

METHODS = ("lora", "textual_inversion", "hypernetwork")
ASSETS = Path(__file__).resolve().parents[2] / "jaxdiff" / "assets" / "digits" / "digits-outline"
LORA_TARGETS = (r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|resnets\.\d+\.(conv[12]|conv_shortcut|time_emb_proj)"
                r"|proj_in|proj_out|ff\.net\.(0\.proj|2)|(up|down)samplers\.0\.conv)$")
"""Every projection of the transformer blocks (attention, feed-forward, the 1x1 in / out) and of the resnets (3x3
convolutions as LoRA-conv, shortcuts, time projections) and the resampling convolutions: a style of stroke is drawn by
the convolutions, which attention-only LoRAs (diffusers' default) barely reach. Measured on 297 held-out captions
(``benchmarks/personalisation.py``): attention + resnet convolutions, 3000 steps: 0.862 outlined; these targets,
3000 steps: 0.886, 5000: 0.899; rank 16 instead of 8 changed nothing (0.862)."""
RECIPES: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8, "targets": LORA_TARGETS, "steps": 8000, "batch_size": 32, "learning_rate": 2e-3,
             "warmup_steps": 50, "context_dropout": 0.1},
    "textual_inversion": {"num_vectors": 2, "init_word": None, "steps": 1500, "batch_size": 32, "learning_rate": 2e-2},
    "hypernetwork": {"layer_structure": [1, 2, 1], "activation": "relu", "steps": 1500, "batch_size": 32,
                     "learning_rate": 3e-3},
}


def _megabytes(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 4)


def train_lora(sd: Any, concept: dict, latents: np.ndarray, out: Path, r: dict) -> dict[str, Any]:
    context = ti_states(sd, concept["caption"])
    trainer, state = lora_trainer(sd, rank=r["rank"], sample_shape=latents.shape[1:], targets=r["targets"],
                                  optimizer=OptimizerConfig(r["learning_rate"], warmup_steps=min(r["warmup_steps"], r["steps"] // 10),
                                                            total_steps=r["steps"], schedule="cosine"),
                                  context_dropout=r["context_dropout"])
    dataset = ArrayDataset({"x": latents, "context": context}, batch_size=r["batch_size"], seed=0)
    trace: list = []
    start = time.perf_counter()
    state = fit(trainer, state, dataset, r["steps"], progress=False,
                callback=lambda i, s, m: trace.append([i, round(float(m["loss"]), 5)]) if i % 50 == 0 else None)
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    path = save_lora(out / FILES["lora"], trained_lora(trainer, state, name="outline"), "kohya")
    params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
    return {"seconds": round(seconds, 1), "parameters": params, "megabytes": _megabytes(path), "loss_trace": trace}


def ti_states(sd: Any, prompts: list[str]) -> np.ndarray:
    """Text states (N, L, D) of ``prompts``, in chunks."""
    fn = jax.jit(lambda m, i: m.encode_text(i))
    ids = sd.tokenize(prompts)
    return np.concatenate([np.asarray(fn(sd.models, ids[k:k + 64])) for k in range(0, len(ids), 64)])


def train_embedding(sd: Any, concept: dict, latents: np.ndarray, out: Path, r: dict) -> dict[str, Any]:
    start = time.perf_counter()
    _, emb, history = ti.train_embedding(sd, TOKEN, None, with_token(concept["caption"]),
                                         num_vectors=r["num_vectors"], init_word=r["init_word"], steps=r["steps"],
                                         learning_rate=r["learning_rate"], batch_size=r["batch_size"], latents=latents)
    seconds = time.perf_counter() - start
    path = ti.save_embedding(out / FILES["textual_inversion"], emb)
    return {"seconds": round(seconds, 1), "parameters": int(np.size(emb.vectors)), "megabytes": _megabytes(path),
            "loss_trace": [[i, round(float(v), 5)] for i, v in enumerate(history) if i % 50 == 0]}


def train_hypernetwork(sd: Any, concept: dict, latents: np.ndarray, out: Path, r: dict) -> dict[str, Any]:
    start = time.perf_counter()
    hn, history = hnet.train_hypernetwork(sd, None, concept["caption"], steps=r["steps"],
                                          learning_rate=r["learning_rate"], batch_size=r["batch_size"],
                                          latents=latents, layer_structure=tuple(r["layer_structure"]),
                                          activation=r["activation"], name="outline")
    seconds = time.perf_counter() - start
    path = hnet.save_hypernetwork(out / FILES["hypernetwork"], hn)
    return {"seconds": round(seconds, 1), "parameters": int(hn.num_params()), "megabytes": _megabytes(path),
            "loss_trace": [[i, round(float(v), 5)] for i, v in enumerate(history) if i % 50 == 0]}


TRAIN = {"lora": train_lora, "textual_inversion": train_embedding, "hypernetwork": train_hypernetwork}


def run(out: str | os.PathLike, methods: tuple[str, ...] = METHODS, *, steps: int | None = None) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = builtin.load_pipeline("digits-sd")
    concept = concept_set(load_digits_text()["train"])
    latents = ti.encode_images(sd, concept["image"])
    log_path = out / "training.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["concept"] = {"style": "outline", "examples": len(concept["caption"]), "token": TOKEN}
    for m in methods:
        recipe = dict(RECIPES[m], **({"steps": steps} if steps else {}))
        log[m] = {"recipe": recipe, **TRAIN[m](sd, concept, latents, out, recipe), "cpu_count": os.cpu_count()}
        print(json.dumps({m: {k: v for k, v in log[m].items() if k != "loss_trace"}}), file=sys.stderr, flush=True)
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    return log


def install(out: Path, assets: Path = ASSETS) -> Path:
    """Copy the three files and ``training.json`` into the package's ``digits-outline`` folder."""
    missing = [f for f in (*FILES.values(), "training.json") if not (Path(out) / f).exists()]
    if missing:
        raise FileNotFoundError(f"{missing} missing in {out}: train all three methods before --install")
    assets.mkdir(parents=True, exist_ok=True)
    for f in (*FILES.values(), "training.json"):
        shutil.copy2(Path(out) / f, assets / f)
    return assets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="training steps of every method (default: the recipes')")
    p.add_argument("--install", action="store_true", help="afterwards, replace the package's digits-outline files")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    if args.install and (args.steps or set(methods) != set(METHODS)):
        p.error("--install ships a full run of the three recipes: drop --methods and --steps")
    log = run(args.out, methods, steps=args.steps)
    if args.install:
        target = install(args.out)
        log["installed"] = {target.name: str(target)}
    summary = {k: {m: v for m, v in rec.items() if not isinstance(v, (dict, list))} for k, rec in log.items()}
    print(json.dumps(summary, indent=1))
    return log


if __name__ == "__main__":
    main()
