"""Train digits-unclip: unCLIP (Ramesh et al. 2022) on jaxdiff's captioned colour digits, in digits-clip's space.

    python examples/unclip/train.py --out DIR [--stages decoder,prior]
    python examples/unclip/train.py --out DIR --install   # retrain both and ship jaxdiff/assets/digits/digits-unclip

- ``decoder``: digits-sd's latent U-Net (same VAE, same 8x8x4 latents, same betas, epsilon prediction) made
  image-conditional: ``class_embed_type="identity"`` adds a projection of the digits-clip IMAGE embedding (unit
  norm) to the time embedding, and ``clip_extra_context_tokens`` more projections of it form the whole
  cross-attention context (:class:`jaxdiff.models.unclip_image_proj.UnCLIPImageProj`, diffusers'
  ``UnCLIPTextProjModel`` names). The embedding becomes the learned null embedding with probability
  ``embedding_dropout`` (classifier-free guidance; unCLIP's decoder drops it 10% of the time). The U-Net starts
  from digits-sd's weights (fine-tuned: the recipe's ``init``) and is stored as float16 to fit the 3 MB budget.
- ``prior``: a ``PriorTransformer`` (:mod:`jaxdiff.models.prior`) from the caption's digits-clip text embedding
  and text states to the unit image embedding, predicting the clean embedding (unCLIP sec. 2.2: "we train the
  decoder-only Transformer to predict the unnoised z_i directly") on the squared-cosine betas, with the caption
  replaced by the empty prompt with probability ``text_dropout``.

Data order, noise levels and dropout are functions of the recipe's seed and the step, so a rerun pinned to one core
should retrain the same weights (not confirmed by a second full run); ``DIR/training.json`` records each stage.
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

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.convert import load_torch_tensors, open_safetensors
from jaxdiff.convert.export import save_pretrained
from jaxdiff.data import load_digits_text
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import DenoisingLoss, ddpm_loss
from jaxdiff.models.unclip_image_proj import UnCLIPImageProj, UnCLIPImageProjConfig, select_embeddings
from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jaxdiff.pipelines import unclip_digits as ud
from jaxdiff.pipelines.schedulers import training_schedule
from jaxdiff.train import ArrayDataset, OptimizerConfig, Trainer, fit_recorded
from jaxdiff.train.objectives import _check_template, _with_net

CONFIGS = Path(__file__).resolve().parent / "configs"
STAGES = ("decoder", "prior")
ASSETS = Path(__file__).resolve().parents[2] / "jaxdiff" / "assets" / "digits"
Array = jax.Array


def load_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The recipe ``configs/<name>.json`` with top-level keys replaced by ``overrides``."""
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown {name} recipe keys {sorted(unknown)}; valid: {sorted(k for k in cfg if k[0] != '_')}")
    return {**cfg, **overrides}


def _optimizer(cfg: dict[str, Any], steps: int) -> OptimizerConfig:
    opt = cfg["optimizer"]
    return OptimizerConfig(total_steps=max(steps, opt.get("warmup_steps", 0) + 1), **opt)


def _fit(trainer: Trainer, state: Any, dataset: Any, steps: int, progress: bool, every: int = 100) -> tuple[Any, dict]:
    return fit_recorded(trainer, state, dataset, steps, progress=progress, trace_every=every)


def _count(model: nnx.Module) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------- decoder

class DecoderNet(nnx.Module):
    """``net(x, t, {"embedding", "keep"})``: the image projection (with classifier-free dropout) and the U-Net."""

    def __init__(self, unet: UNet2DConditionModel, image_proj: UnCLIPImageProj):
        self.unet, self.image_proj = unet, image_proj

    def __call__(self, x: Array, t: Array, cond: dict[str, Array]) -> Array:
        e = select_embeddings(self.image_proj, cond["embedding"], cond["keep"])
        tokens, time_add = self.image_proj(e)
        return self.unet(x, t, tokens, class_labels=time_add)


@pytree_dataclass
class EmbeddingDiffusionObjective:
    """The denoising loss conditioned on one embedding per sample, which is dropped (replaced inside the network
    by its learned null embedding) with probability ``dropout``. Batches: ``"x"`` and ``"embedding"`` (B, d)."""

    loss: DenoisingLoss
    denoiser: Any
    dropout: float = 0.1

    needs_labels = False
    batch_keys = ("x", "embedding")

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")

    def denoiser_for(self, net: Callable[..., Array]) -> Any:
        return _with_net(self.denoiser, net)

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        k_loss, k_drop = jax.random.split(key)
        keep = ~jax.random.bernoulli(k_drop, jnp.asarray(self.dropout, jnp.float32), (batch["x"].shape[0],))
        cond = {"embedding": batch["embedding"], "keep": keep}
        return self.loss(self.denoiser_for(net), batch["x"], k_loss, cond), {}


def decoder_unet(cfg: dict[str, Any], sd_folder: Path) -> UNet2DConditionModel:
    """digits-sd's U-Net config with ``class_embed_type="identity"``; its weights when the recipe says ``init: sd``."""
    sd_cfg = json.loads((sd_folder / "unet" / "config.json").read_text())
    config = UNet2DConditionConfig.from_dict({**sd_cfg, **cfg["unet_overrides"]})
    model = UNet2DConditionModel(config, rngs=nnx.Rngs(cfg["seed"]))
    if cfg["init"] == "sd":
        with open_safetensors(sd_folder / "unet" / "diffusion_pytorch_model.safetensors") as tensors:
            model = load_torch_tensors(model, tensors)
    elif cfg["init"] != "random":
        raise ValueError(f"decoder recipe 'init' must be 'sd' or 'random', got {cfg['init']!r}")
    return model


def decoder_data(split: dict[str, np.ndarray], sd_folder: Path) -> dict[str, np.ndarray]:
    """Scaled VAE latents (posterior means, as digits-sd trains) and unit digits-clip image embeddings."""
    vae = ud.load_vae(sd_folder)
    clip = ud.load_image_encoder()
    return {"x": ud.encode_latents(vae, split["image"]), "embedding": ud.image_embeddings(clip, split["image"])}


def train_decoder(cfg: dict[str, Any], arrays: dict[str, np.ndarray], sd_folder: Path, *, steps: int | None = None,
                  progress: bool = True) -> tuple[DecoderNet, dict[str, Any]]:
    steps = cfg["steps"] if steps is None else steps
    sched = json.loads((sd_folder / "scheduler" / "scheduler_config.json").read_text())
    ac = jnp.asarray(training_schedule(sched).alphas_cumprod, jnp.float32)
    unet = decoder_unet(cfg, sd_folder)
    proj_cfg = UnCLIPImageProjConfig(int(arrays["embedding"].shape[-1]), 4 * unet.config.block_out_channels[0],
                                     int(unet.config.cross_attention_dim), cfg["clip_extra_context_tokens"])
    model = DecoderNet(unet, UnCLIPImageProj(proj_cfg, rngs=nnx.Rngs(cfg["seed"] + 1)))
    objective = EmbeddingDiffusionObjective(ddpm_loss(ac), DiscreteVPDenoiser(None, ac, "epsilon"),
                                            cfg["embedding_dropout"])
    trainer, state = Trainer.create(model, objective, _optimizer(cfg, steps), sample_shape=arrays["x"].shape[1:],
                                    seed=cfg["seed"], ema_decay=cfg["ema_decay"], ema_warmup=True)
    dataset = ArrayDataset({k: v.astype(np.float32) for k, v in arrays.items()},
                           batch_size=min(cfg["batch_size"], len(arrays["x"])), seed=cfg["seed"])
    state, record = _fit(trainer, state, dataset, steps, progress)
    return nnx.merge(trainer.graphdef, state.ema, state.buffers), record


def save_decoder(model: DecoderNet, folder: Path, sd_folder: Path) -> None:
    """``folder/unet`` (diffusers ``UNet2DConditionModel``, float16), ``folder/text_proj`` (the image projection) and
    ``folder/scheduler_config.json`` (digits-sd's: same betas, DPM-Solver++ 2M)."""
    save_pretrained(model.unet, folder / "unet", dataclasses.asdict(model.unet.config),
                    class_name="UNet2DConditionModel", library="diffusers", dtype=jnp.float16)
    save_pretrained(model.image_proj, folder / "text_proj", dataclasses.asdict(model.image_proj.config),
                    class_name="UnCLIPImageProjModel", library="diffusers")
    shutil.copy2(sd_folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")


def run_decoder(cfg: dict[str, Any], data: dict[str, Any], out: Path, *, steps: int | None, progress: bool) -> dict:
    sd_folder = ud.builtin_path("digits-sd")
    start = time.perf_counter()
    arrays = decoder_data(data["train"], sd_folder)
    prep = time.perf_counter() - start
    model, record = train_decoder(cfg, arrays, sd_folder, steps=steps, progress=progress)
    save_decoder(model, out / "decoder", sd_folder)
    return {"parameters_unet": _count(model.unet), "parameters_image_proj": _count(model.image_proj),
            "precompute_seconds": round(prep, 1), "latent_std": float(np.std(arrays["x"])), "training": record,
            "recipe": {k: v for k, v in cfg.items() if k[0] != "_"}}


# ----------------------------------------------------------------------------------------------- folder

def folder_megabytes(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


def assemble(out: Path) -> Path:
    """``out/digits-unclip``: ``prior/``, ``decoder/{unet,text_proj}``, ``decoder/scheduler_config.json`` and the
    ``model_index.json`` naming digits-sd's VAE and digits-clip by reference."""
    folder = out / "digits-unclip"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for part in ("prior", "decoder"):
        if (out / part).is_dir():
            shutil.copytree(out / part, folder / part)
    (folder / "model_index.json").write_text(json.dumps(ud.model_index(), indent=2) + "\n")
    return folder


def run(out: str | os.PathLike, stages: tuple[str, ...] = STAGES, *, steps: dict[str, int] | None = None,
        configs: dict[str, dict[str, Any]] | None = None, progress: bool = True,
        data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``stages`` into ``out``, assemble ``out/digits-unclip`` and return the ``training.json`` record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, configs = steps or {}, configs or {}
    log_path = out / "training.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    data = load_digits_text() if data is None else data
    for name in stages:
        cfg = configs.get(name) or load_config(name)
        start = time.perf_counter()
        if name == "decoder":
            rec = run_decoder(cfg, data, out, steps=steps.get(name), progress=progress)
        else:
            import train_prior  # noqa: PLC0415  (the prior stage, beside this file)

            rec = train_prior.run_prior(cfg, data, out, steps=steps.get(name), progress=progress)
        log[name] = {"seconds": round(time.perf_counter() - start, 1), **rec}
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    if all((out / p).is_dir() for p in ("prior", "decoder")):
        folder = assemble(out)
        log["digits-unclip"] = {"folder": str(folder), "megabytes": folder_megabytes(folder),
                                "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend()}
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    return log


def install(out: Path, assets: Path = ASSETS) -> Path:
    source, target = Path(out) / "digits-unclip", Path(assets) / "digits-unclip"
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is missing: run both stages before --install")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    shutil.copy2(Path(out) / "training.json", target / "training.json")
    return target


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (prior/, decoder/, digits-unclip/)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of decoder,prior")
    for s in STAGES:
        p.add_argument(f"--{s}-steps", type=int, default=None, help=f"{s} training steps (default: the recipe's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--install", action="store_true", help="afterwards, replace the package's digits-unclip with DIR's")
    args = p.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stages {bad}; valid: {', '.join(STAGES)}")
    steps = {s: getattr(args, f"{s}_steps") for s in STAGES if getattr(args, f"{s}_steps") is not None}
    log = run(args.out, stages, steps=steps, progress=not args.no_progress)
    if args.install:
        log["installed"] = str(install(args.out))
    print(json.dumps({k: {m: v for m, v in r.items() if not isinstance(v, (dict, list))} if isinstance(r, dict) else r
                      for k, r in log.items()}, indent=1))
    return log


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
