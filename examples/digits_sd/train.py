"""Train digits-sd: a tiny Stable Diffusion (CLIP text tower, KL autoencoder, text-conditioned U-Net) on jaxdiff's
captioned colour digits, and write it as a diffusers ``StableDiffusionPipeline`` folder.

    python examples/digits_sd/train.py --out DIR [--stages clip,vae,unet] [--clip CLIP_DIR]
    python examples/digits_sd/train.py --out DIR --install   # retrain and ship: jaxdiff/assets/digits/digits-{clip,sd}

Stages run in order; each reuses the earlier stages' outputs found in ``DIR`` when it is not rerun:

- ``clip``: ``train_clip.run(load_config(), DIR/digits-clip)`` (or ``--clip`` names an existing digits-clip folder).
- ``vae``: an ``AutoencoderKL`` 32x32x3 -> 8x8x4 (``configs/vae.json``) trained with L1 reconstruction plus a
  tiny KL weight (latent diffusion's KL-f8 recipe without its GAN and LPIPS terms); ``scaling_factor`` is set to
  1 / std of the training latents, as SD's 0.18215 was chosen. Written to ``DIR/vae``.
- ``unet``: a ``UNet2DConditionModel`` on the scaled latents (``configs/unet.json``): epsilon prediction on SD's
  scaled-linear 1000-step betas, conditioned on the frozen text tower's ``last_hidden_state`` of the caption,
  replaced by the empty prompt's with probability ``context_dropout`` (classifier-free guidance training).
  The recipe's ``text_layers`` (1 as shipped; null: all) cuts the tower to its first layers first
  (:func:`text_encoder_folder`).
  Written to ``DIR/unet``, the text encoder it read to ``DIR/text_encoder``.

Then ``DIR/digits-sd`` is assembled (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` = the
CLIP text tower the U-Net read as ``CLIPTextModel``, ``tokenizer/``, ``scheduler/`` = DPM-Solver++ 2M on the
training betas) and ``DIR/training.json`` records each stage's wall time and metrics.
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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_clip  # noqa: E402  (the digits-clip stage and its tokenizer helpers)

from jaxdiff.convert import load_model_folder  # noqa: E402
from jaxdiff.convert.export import save_pretrained  # noqa: E402
from jaxdiff.data import load_digits_text  # noqa: E402
from jaxdiff.data.digits_text import judge_input  # noqa: E402
from jaxdiff.denoisers import DiscreteVPDenoiser  # noqa: E402
from jaxdiff.losses import ddpm_loss  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402
from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402
from jaxdiff.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from jaxdiff.pipelines.schedulers import training_schedule  # noqa: E402
from jaxdiff.train import ArrayDataset, OptimizerConfig, Trainer, fit_recorded  # noqa: E402
from jaxdiff.train.autoencoder import AutoencoderObjective  # noqa: E402
from jaxdiff.train.objectives import TextDiffusionObjective  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
STAGES = ("clip", "vae", "unet")
ASSETS = Path(__file__).resolve().parents[2] / "jaxdiff" / "assets" / "digits"  # where --install puts the folders
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
LATENTS = ("mean", "sample")


def load_config(name: str, path: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """The recipe ``configs/<name>.json`` (or ``path``) with top-level keys replaced by ``overrides``."""
    cfg = json.loads(Path(path or CONFIGS / f"{name}.json").read_text())
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown {name} recipe keys {sorted(unknown)}; "
                         f"valid: {sorted(k for k in cfg if k[0] != '_')}")
    return {**cfg, **overrides}


def to_pixels(images: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> [-1, 1], the VAE's input range (diffusers' ``2 * image - 1``)."""
    return (np.asarray(images, np.float32) * 2 - 1).astype(np.float32)


def _optimizer(cfg: dict[str, Any], steps: int) -> OptimizerConfig:
    opt = cfg["optimizer"]
    return OptimizerConfig(total_steps=max(steps, opt.get("warmup_steps", 0) + 1), **opt)


def _fit(trainer: Trainer, state: Any, dataset: ArrayDataset, steps: int, progress: bool,
         every: int = 50) -> tuple[Any, dict[str, Any]]:
    """``fit`` with a loss trace every ``every`` steps and the wall time (:func:`jaxdiff.train.fit_recorded`)."""
    return fit_recorded(trainer, state, dataset, steps, progress=progress, trace_every=every)


def _count(model: nnx.Module) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _chunked(fn: Callable[[jax.Array], Any], x: np.ndarray, chunk: int = 256) -> Any:
    outs = [jax.device_get(fn(jnp.asarray(x[i:i + chunk]))) for i in range(0, len(x), chunk)]
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)


@jax.jit
def _apply(model: PureModel, x: jax.Array) -> Any:
    """``model(x)``, compiled once per network, method and input shape and reused by later calls (a new
    ``jax.jit`` of a lambda in each call traced and compiled again every time)."""
    return model(x)


# ----------------------------------------------------------------------------------------------- VAE

def vae_config(cfg: dict[str, Any], scaling_factor: float = 1.0) -> AutoencoderKLConfig:
    m = cfg["model"]
    return AutoencoderKLConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()},
                               scaling_factor=scaling_factor)


def train_vae(cfg: dict[str, Any], images: np.ndarray, *, steps: int | None = None,
              progress: bool = True) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Train the recipe's autoencoder on RGB ``images`` in [0, 1]; returns the EMA model and a record."""
    steps = cfg["steps"] if steps is None else steps
    model = AutoencoderKL(vae_config(cfg), rngs=nnx.Rngs(cfg["seed"]))
    objective = AutoencoderObjective(**cfg["objective"])
    trainer, state = Trainer.create(model, objective, _optimizer(cfg, steps), sample_shape=images.shape[1:],
                                    seed=cfg["seed"], ema_decay=cfg["ema_decay"], ema_warmup=True)
    dataset = ArrayDataset({"x": to_pixels(images)}, batch_size=min(cfg["batch_size"], len(images)), seed=cfg["seed"])
    state, record = _fit(trainer, state, dataset, steps, progress)
    return nnx.merge(trainer.graphdef, state.ema, state.buffers), record


def encode_latents(vae: AutoencoderKL, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB [0, 1] images -> the posterior's (mean, std), unscaled."""
    pure = PureModel.of(vae, "encode")
    mean, logvar = _chunked(lambda x: _apply(pure, x), to_pixels(images))
    return mean, np.exp(0.5 * logvar)


def decode_latents(vae: AutoencoderKL, z: np.ndarray) -> np.ndarray:
    """Unscaled latents -> RGB in [0, 1] (clipped)."""
    pure = PureModel.of(vae, "decode")
    return np.clip(_chunked(lambda x: _apply(pure, x), z) / 2 + 0.5, 0.0, 1.0)


def judge_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """The digits-eval judge's accuracy on RGB [0, 1] digits (converted with ``judge_input``)."""
    from jaxdiff.builtin import load_builtin

    judge = load_builtin("digits-eval")
    logits = _chunked(lambda x: _apply(judge, x), np.asarray(judge_input(images), np.float32))
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of ``10 log10(1 / mse)`` for images in [0, 1]."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def evaluate_vae(vae: AutoencoderKL, held_out: dict[str, np.ndarray]) -> dict[str, Any]:
    """Reconstruction through the posterior mean of the held-out digits: PSNR and the judge's accuracy."""
    mean, _ = encode_latents(vae, held_out["image"])
    recon = decode_latents(vae, mean)
    return {"vae_recon_psnr_db": round(psnr_db(recon, held_out["image"]), 3),
            "vae_recon_judge_accuracy": judge_accuracy(recon, held_out["label"]),
            "judge_accuracy_originals": judge_accuracy(held_out["image"], held_out["label"])}


def save_vae(vae: AutoencoderKL, folder: Path) -> Path:
    """Write a diffusers ``AutoencoderKL`` folder (the config carries the scaling factor)."""
    config = dataclasses.asdict(vae.config)
    save_pretrained(vae, folder, config, class_name="AutoencoderKL", library="diffusers")
    return folder


def with_scaling_factor(vae: AutoencoderKL, scaling_factor: float) -> AutoencoderKL:
    """The same weights with ``config.scaling_factor`` replaced."""
    vae.config = dataclasses.replace(vae.config, scaling_factor=float(scaling_factor))
    return vae


def run_vae(cfg: dict[str, Any], data: dict[str, Any], out: Path, *, steps: int | None, progress: bool) -> dict:
    vae, record = train_vae(cfg, data["train"]["image"], steps=steps, progress=progress)
    mean, std = encode_latents(vae, data["train"]["image"])
    # 1 / std of the training latents the U-Net sees (the posterior means; see unet.json "latents").
    scale = 1.0 / float(np.std(mean))
    vae = with_scaling_factor(vae, scale)
    metrics = evaluate_vae(vae, data["held_out"])
    save_vae(vae, out / "vae")
    return {**metrics, "scaling_factor": scale, "latent_std": float(np.std(mean)),
            "posterior_std_mean": float(np.mean(std)), "parameters": _count(vae), "training": record,
            "recipe": {k: v for k, v in cfg.items() if k[0] != "_"}}


# ------------------------------------------------------------------------------------------ text tower

def load_text_encoder(clip_dir: Path) -> nnx.Module:
    """digits-clip's text tower as jaxdiff's ``CLIPTextModel`` (the ``text_model.*`` weights of the CLIPModel)."""
    return load_model_folder(clip_dir, class_name="CLIPTextModel")


def text_encoder_folder(clip_dir: Path, folder: Path, layers: int | None = None) -> Path:
    """Write digits-clip's text tower to ``folder`` as a ``CLIPTextModel``, cut to its first ``layers`` causal layers
    (None: all), as SD 2.x folders ship their text encoder cut at the layer the U-Net reads: the folder's
    ``last_hidden_state`` is the tower's hidden state ``layers`` through the final norm. ``layers=0`` keeps the token
    and position embeddings only, so each word's state holds that word alone."""
    from safetensors.numpy import load_file, save_file

    tower = load_text_encoder(clip_dir)
    total = int(tower.config.num_hidden_layers)
    if layers is not None and not 0 <= layers <= total:
        raise ValueError(f"text_layers must be between 0 and the text tower's {total} layers, got {layers}")
    save_pretrained(tower, folder)
    if layers is None or layers == total:
        return folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2) + "\n")
    for weights in folder.glob("*.safetensors"):
        kept = {k: v for k, v in load_file(weights).items()
                if not (".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= layers)}
        save_file(kept, weights, metadata={"format": "pt"})
    return folder


def load_tokenizer(clip_dir: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_dir))


def text_states(text_encoder: nnx.Module, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """(N, L, D) ``last_hidden_state`` of ``texts`` padded to the tower's length, as SD's pipeline encodes prompts."""
    length = int(text_encoder.config.max_position_embeddings)
    ids = train_clip.tokenize(tokenizer, texts, length)
    pure = PureModel.of(text_encoder, "hidden_state")
    return _chunked(lambda i: _apply(pure, i), ids).astype(np.float32)


# ----------------------------------------------------------------------------------------------- U-Net

def scheduler_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``DPMSolverMultistepScheduler`` config (DPM-Solver++ 2M) on the recipe's training betas."""
    return {"_class_name": "DPMSolverMultistepScheduler", **cfg["scheduler"], "algorithm_type": "dpmsolver++",
            "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "thresholding": False,
            "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": False, "trained_betas": None}


def unet_config(cfg: dict[str, Any], cross_attention_dim: int) -> UNet2DConditionConfig:
    m = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"].items()}
    return UNet2DConditionConfig(**m, cross_attention_dim=cross_attention_dim)


def train_unet(cfg: dict[str, Any], latents: np.ndarray, context: np.ndarray, null_context: np.ndarray, *,
               steps: int | None = None, progress: bool = True) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """Train the recipe's U-Net on scaled ``latents`` (N, h, w, c) with text states ``context`` (N, L, D)."""
    steps = cfg["steps"] if steps is None else steps
    train = training_schedule(scheduler_config(cfg))
    ac = jnp.asarray(train.alphas_cumprod, jnp.float32)
    model = UNet2DConditionModel(unet_config(cfg, int(context.shape[-1])), rngs=nnx.Rngs(cfg["seed"]))
    objective = TextDiffusionObjective(ddpm_loss(ac), DiscreteVPDenoiser(None, ac, "epsilon"),
                                       jnp.asarray(null_context), cfg["context_dropout"])
    trainer, state = Trainer.create(model, objective, _optimizer(cfg, steps), sample_shape=latents.shape[1:],
                                    seed=cfg["seed"], ema_decay=cfg["ema_decay"], ema_warmup=True)
    dataset = ArrayDataset({"x": latents.astype(np.float32), "context": context.astype(np.float32)},
                           batch_size=min(cfg["batch_size"], len(latents)), seed=cfg["seed"])
    state, record = _fit(trainer, state, dataset, steps, progress)
    return nnx.merge(trainer.graphdef, state.ema, state.buffers), record


def unet_data(cfg: dict[str, Any], vae: AutoencoderKL, text_encoder: nnx.Module, tokenizer: Any,
              split: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scaled latents, caption states, empty-prompt states) computed once for the whole training set."""
    if cfg["latents"] not in LATENTS:
        raise ValueError(f"unet recipe 'latents' must be one of {LATENTS}, got {cfg['latents']!r}")
    mean, std = encode_latents(vae, split["image"])
    z = mean
    if cfg["latents"] == "sample":
        z = mean + std * np.random.default_rng(cfg["seed"]).standard_normal(mean.shape).astype(np.float32)
    latents = (z * vae.config.scaling_factor).astype(np.float32)
    context = text_states(text_encoder, tokenizer, [str(c) for c in split["caption"]])
    null = text_states(text_encoder, tokenizer, [""])[0]
    return latents, context, null


def run_unet(cfg: dict[str, Any], data: dict[str, Any], out: Path, clip_dir: Path, *, steps: int | None,
             progress: bool) -> dict:
    vae = load_model_folder(out / "vae", class_name="AutoencoderKL")
    # the text encoder the U-Net reads travels with it into the assembled folder
    text_dir = text_encoder_folder(clip_dir, out / "text_encoder", cfg.get("text_layers"))
    text, tok = load_model_folder(text_dir, class_name="CLIPTextModel"), load_tokenizer(clip_dir)
    start = time.perf_counter()
    latents, context, null = unet_data(cfg, vae, text, tok, data["train"])
    prep = time.perf_counter() - start
    unet, record = train_unet(cfg, latents, context, null, steps=steps, progress=progress)
    config = dataclasses.asdict(unet.config)
    save_pretrained(unet, out / "unet", config, class_name="UNet2DConditionModel", library="diffusers")
    (out / "unet" / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg), indent=2) + "\n")
    return {"parameters": _count(unet), "precompute_seconds": round(prep, 1),
            "latent_std_scaled": float(np.std(latents)), "training": record,
            "recipe": {k: v for k, v in cfg.items() if k[0] != "_"}}


# --------------------------------------------------------------------------------------------- folder

def model_index() -> dict[str, Any]:
    """diffusers' ``model_index.json`` of a ``StableDiffusionPipeline`` without safety checker."""
    from jaxdiff.convert.export import _version

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _version("diffusers"),
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def assemble(out: Path, clip_dir: Path) -> Path:
    """Write ``out/digits-sd`` from ``out/vae``, ``out/unet`` and the digits-clip folder ``clip_dir``."""
    folder = out / "digits-sd"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("vae", "unet"):
        (folder / name).mkdir()
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy2(out / name / f, folder / name / f)
    (folder / "scheduler").mkdir()
    shutil.copy2(out / "unet" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    if (out / "text_encoder" / "config.json").exists():  # the one the U-Net stage trained on
        shutil.copytree(out / "text_encoder", folder / "text_encoder")
    else:
        save_pretrained(load_text_encoder(clip_dir), folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    for f in TOKENIZER_FILES:
        if (clip_dir / f).exists():
            shutil.copy2(clip_dir / f, folder / "tokenizer" / f)
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    return folder


def folder_megabytes(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


# ------------------------------------------------------------------------------------------ quick look

def quick_look(folder: Path, split: dict[str, np.ndarray], *, n: int = 100, guidance: tuple[float, ...] = (3.0, 5.0),
               steps: int = 20, seed: int = 0) -> dict[str, Any]:
    """Generate from the first ``n`` captions of ``split`` with jaxdiff (the folder's DPM-Solver++ 2M, ``steps``
    steps) at each guidance scale; the judge's digit accuracy and the measured ink + background colour accuracy."""
    from jaxdiff.data.digits_text import measure_attributes
    from jaxdiff.pipelines import StableDiffusion

    sd = StableDiffusion.from_pretrained(folder)
    captions = [str(c) for c in split["caption"][:n]]
    labels = np.asarray(split["label"][:n])
    out: dict[str, Any] = {"prompts": len(captions), "steps": steps, "sampler": "folder default (DPM-Solver++ 2M)"}
    for g in guidance:
        start = time.perf_counter()
        images = np.asarray(sd(captions, steps=steps, guidance=g, seed=list(range(seed, seed + len(captions)))))
        attrs = measure_attributes(images, labels)
        colour = ((attrs["ink"] == np.asarray(split["ink"][:n]))
                  & (attrs["background"] == np.asarray(split["background"][:n])))
        out[f"guidance_{g:g}"] = {"prompt_digit_accuracy": judge_accuracy(images, labels),
                                  "prompt_colour_accuracy": float(np.mean(colour)),
                                  "seconds": round(time.perf_counter() - start, 1)}
    return out


# ----------------------------------------------------------------------------------------------- main

def parse_stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stages {bad}; valid: {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in stages)  # always in pipeline order


def run(out: str | os.PathLike, stages: tuple[str, ...] = STAGES, *, clip: str | os.PathLike | None = None,
        steps: dict[str, int] | None = None, configs: dict[str, dict[str, Any]] | None = None,
        progress: bool = True, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``stages`` into ``out``, assemble ``out/digits-sd`` and return the ``training.json`` record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, configs = steps or {}, configs or {}
    log_path = out / "training.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    data = load_digits_text() if data is None else data
    clip_dir = Path(clip) if clip is not None else out / "digits-clip"
    if "clip" in stages:
        if clip is not None:
            raise ValueError("--clip names an existing digits-clip folder; drop the clip stage or --clip")
        start = time.perf_counter()
        rec = train_clip.run(configs.get("clip") or train_clip.load_config(), clip_dir, steps=steps.get("clip"),
                             progress=progress, data=data)
        log["clip"] = {"seconds": round(time.perf_counter() - start, 1), **rec}
    for name in ("vae", "unet"):
        if name not in stages:
            if name == "vae" and "unet" in stages and not (out / name / "config.json").exists():
                raise FileNotFoundError(f"{out / name} is missing: run the {name} stage (--stages ...,{name})")
            continue
        if not (clip_dir / "config.json").exists() and name == "unet":
            raise FileNotFoundError(f"no digits-clip folder at {clip_dir}: run the clip stage or pass --clip")
        cfg = configs.get(name) or load_config(name)
        start = time.perf_counter()
        rec = (run_vae(cfg, data, out, steps=steps.get(name), progress=progress) if name == "vae" else
               run_unet(cfg, data, out, clip_dir, steps=steps.get(name), progress=progress))
        log[name] = {"seconds": round(time.perf_counter() - start, 1), **rec}
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    if not (clip_dir / "config.json").exists() or not (out / "unet" / "config.json").exists():
        print(f"not assembling {out / 'digits-sd'}: it needs {clip_dir}, {out / 'vae'} and {out / 'unet'}",
              file=sys.stderr)
        return log
    folder = assemble(out, clip_dir)
    log["digits-sd"] = {"folder": str(folder), "megabytes": folder_megabytes(folder), "clip": str(clip_dir),
                        "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend()}
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    return log


def install(out: Path, assets: Path = ASSETS) -> list[Path]:
    """Copy ``out/digits-clip`` and ``out/digits-sd`` over the package's built-in folders (with ``training.json``
    beside digits-sd's components: diffusers reads only the folders ``model_index.json`` names)."""
    targets = []
    for name in ("digits-clip", "digits-sd"):
        source, target = Path(out) / name, Path(assets) / name
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is missing: run all stages before --install")
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        targets.append(target)
    shutil.copy2(Path(out) / "training.json", Path(assets) / "digits-sd" / "training.json")
    return targets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (stages' outputs, digits-sd, training.json)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of clip,vae,unet")
    p.add_argument("--clip", type=Path, default=None, help="an existing digits-clip folder (not DIR/digits-clip)")
    for s in STAGES:
        p.add_argument(f"--{s}-steps", type=int, default=None, help=f"{s} training steps (default: the recipe's)")
    p.add_argument("--look", type=int, default=0, metavar="N",
                   help="afterwards, generate from N held-out captions and record digit and colour accuracy")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--install", action="store_true",
                   help="afterwards, replace the package's built-in digits-clip and digits-sd with DIR's")
    args = p.parse_args(argv)
    steps = {s: getattr(args, f"{s}_steps") for s in STAGES if getattr(args, f"{s}_steps") is not None}
    if args.install and (steps or args.clip is not None or set(parse_stages(args.stages)) != set(STAGES)):
        p.error("--install ships a full run of the recipes: drop --stages, --clip and the --*-steps options")
    log = run(args.out, parse_stages(args.stages), clip=args.clip, steps=steps, progress=not args.no_progress)
    if args.look and "digits-sd" in log:
        log["quick_look"] = quick_look(args.out / "digits-sd", load_digits_text()["held_out"], n=args.look)
        (args.out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    if args.install:
        log["installed"] = {p.name: str(p) for p in install(args.out)}
    summary = {k: {m: v for m, v in rec.items() if not isinstance(v, (dict, list))} for k, rec in log.items()}
    print(json.dumps(summary, indent=1))
    return log


if __name__ == "__main__":
    main()
