"""Train digits-cascade: an Imagen / DeepFloyd IF-style text-to-image cascade on jaxdiff's captioned colour digits.

    python examples/cascade/train.py                  # every run of RUNS, in order (one core: taskset -c 0)
    python examples/cascade/train.py sr --steps 100   # one run, a quick trial
    python examples/cascade/train.py --install        # assemble the finished runs: the built-in and the ablation

Three runs, each a diffusers ``UNet2DConditionModel`` trained on the 1000-step cosine (``squaredcos_cap_v2``)
schedule, conditioned on digits-clip's frozen text states of the caption (the empty prompt's states with probability
``CONTEXT_DROPOUT``, for classifier-free guidance); the base predicts the noise (epsilon), the super-resolution runs
predict v (Salimans & Ho 2022, as Imagen's super-resolution models: with epsilon prediction and this budget the
stage reached 14 dB PSNR on real 8x8 inputs, with v 30 dB; :data:`PREDICTION`):

- ``base``: 8x8 RGB digits (the 32x32 images of :func:`jaxdiff.data.load_digits_text` averaged over 4x4 blocks).
- ``sr``: 8x8 -> 32x32 super-resolution (IF stage II): the 8x8 image upsampled bilinearly with aligned corners
  is concatenated to the noisy input after noise-conditioning augmentation (Imagen §2.5; Cascaded Diffusion
  Models §3.2): a level ``t_aug`` drawn uniformly from ``[0, AUG_MAX)`` per example noises it as the
  ``image_noising_scheduler`` does and is given to the network as ``class_labels`` (``class_embed_type="timestep"``).
- ``sr-noaug``: the same network, data, seed and budget without augmentation (``t_aug = 0``): the ablation.

The U-Nets output six channels as IF's do (noise, then variance values, which diffusers' IF pipelines split off);
the variance half is not trained and is written as zeros (the schedulers' ``variance_type`` is ``fixed_small``).
Runs write diffusers folders (``unet/`` float32 and ``training.json``) under ``--work`` (default
``/tmp/jaxdiff-cascade``). ``--install`` writes ``jaxdiff/assets/digits/digits-cascade`` (``stage_1/`` an
``IFPipeline`` folder with digits-clip's text tower, ``stage_2/`` an ``IFSuperResolutionPipeline`` folder, U-Nets
in float16) and ``benchmarks/results/digits-cascade-no-aug`` (the ablation's ``stage_2``).
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jaxdiff import builtin  # noqa: E402
from jaxdiff._pytree import pytree_dataclass, static_field  # noqa: E402
from jaxdiff.conditioning import Concat  # noqa: E402
from jaxdiff.convert.export import save_pretrained  # noqa: E402
from jaxdiff.convert.folders import load_model_folder  # noqa: E402
from jaxdiff.data import load_digits_text  # noqa: E402
from jaxdiff.denoisers import DiscreteVPDenoiser  # noqa: E402
from jaxdiff.losses import DenoisingLoss, ddpm_loss, v_loss  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402
from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402
from jaxdiff.pipelines.cascade import NOISE_LEVEL, resize_align_corners  # noqa: E402
from jaxdiff.pipelines.pixel_cascade import CONTEXT, SuperResolutionNet, TextNet  # noqa: E402
from jaxdiff.pipelines.schedulers import training_schedule  # noqa: E402
from jaxdiff.schedules import vp_sigmas  # noqa: E402
from jaxdiff.train import ArrayDataset, OptimizerConfig, Trainer, fit_recorded  # noqa: E402
from jaxdiff.train.objectives import drop_context  # noqa: E402

WORK = Path("/tmp/jaxdiff-cascade")
ASSETS = ROOT / "jaxdiff" / "assets" / "digits" / "digits-cascade"
ABLATION = ROOT / "benchmarks" / "results" / "digits-cascade-no-aug"
LOW, HIGH, FACTOR = 8, 32, 4
SEED, BATCH, LR, WARMUP, EMA, CONTEXT_DROPOUT = 0, 64, 1e-3, 200, 0.999, 0.1
AUG_MAX = 250  # t_aug ~ U{0, ..., AUG_MAX - 1} on the image-noising schedule (1000 steps: the conditioning was noise for most examples and 1,500 steps did not learn to read it)
STEPS = {"base": 2500, "sr": 3000, "sr-noaug": 3000}
RUNS = tuple(STEPS)
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001,
            "beta_end": 0.02}
PREDICTION = {"base": "epsilon", "sr": "v_prediction", "sr-noaug": "v_prediction"}  # the schedulers' prediction_type
BASE_UNET = {"sample_size": LOW, "in_channels": 3, "out_channels": 6, "block_out_channels": [32, 48],
             "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SR_UNET = {"sample_size": HIGH, "in_channels": 6, "out_channels": 6, "block_out_channels": [16, 32, 32],
           "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
           "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"], "class_embed_type": "timestep"}
BATCH_SIZE = {"base": BATCH, "sr": 16, "sr-noaug": 16}  # text enters the super-resolution U-Net at its 8x8 middle
OPTIMISER = {"base": (LR, WARMUP), "sr": (2e-3, 100), "sr-noaug": (2e-3, 100)}  # (peak learning rate, warmup steps)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


# ------------------------------------------------------------------------------------------- data

def downsample(images: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Area average over ``factor x factor`` blocks: (N, H, W, C) -> (N, H / factor, W / factor, C)."""
    n, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"images of {h}x{w} do not split into {factor}x{factor} blocks")
    return images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


def text_states(texts: list[str]) -> np.ndarray:
    """digits-clip's text tower's ``last_hidden_state`` (N, L, D) of ``texts`` padded to its length (EOS)."""
    model, tok = builtin.load_clip("digits-clip")
    length = int(model.config.text_config.max_position_embeddings)
    ids = np.asarray(tok(list(texts), padding="max_length", max_length=length, truncation=True).input_ids, np.int32)
    fn = jax.jit(lambda m, i: m(i, -1, True))
    pure = PureModel.of(model.text_tower(), "hidden_state")
    return np.concatenate([np.asarray(fn(pure, jnp.asarray(ids[i:i + 512]))) for i in range(0, len(ids), 512)])


def training_data(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``high`` (N, 32, 32, 3) and ``low`` (N, 8, 8, 3) in [-1, 1] and the captions' text states."""
    high = (np.asarray(split["image"], np.float32) * 2 - 1).astype(np.float32)
    return {"high": high, "low": downsample(high).astype(np.float32),
            "context": text_states([str(c) for c in split["caption"]]).astype(np.float32)}


# -------------------------------------------------------------------------------------- objectives

@pytree_dataclass
class BaseObjective:
    """Text-conditioned epsilon regression (Ho et al. 2020 eq. 14) with caption dropout; the U-Net's first
    three output channels are the noise prediction."""

    loss: DenoisingLoss
    alphas_cumprod: jax.Array
    null_context: jax.Array
    context_dropout: float = CONTEXT_DROPOUT
    prediction: str = static_field(default="epsilon")

    needs_labels = False
    batch_keys = ("x", "context")

    def __call__(self, net: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        k_loss, k_drop = jax.random.split(key)
        context = drop_context(batch["context"], self.null_context, k_drop, self.context_dropout)
        den = DiscreteVPDenoiser(TextNet(net), self.alphas_cumprod, prediction=self.prediction)
        return self.loss(den, batch["x"], k_loss, {CONTEXT: context}), {}


@pytree_dataclass
class SuperResolutionObjective:
    """The super-resolution loss with noise-conditioning augmentation (Imagen §2.5): ``batch["low"]`` is
    upsampled with aligned corners, noised at a level ``t_aug ~ U{0..aug_max-1}`` of ``aug_alphas_cumprod`` per
    example (``aug_max=0``: never), concatenated to the noisy sample and the level given to the network, through
    the same :class:`SuperResolutionNet` the cascade samples with."""

    loss: DenoisingLoss
    alphas_cumprod: jax.Array
    aug_alphas_cumprod: jax.Array
    null_context: jax.Array
    context_dropout: float = CONTEXT_DROPOUT
    aug_max: int = static_field(default=AUG_MAX)
    prediction: str = static_field(default="epsilon")

    needs_labels = False
    batch_keys = ("x", "low", "context")

    def levels(self, key: jax.Array, batch: int) -> jax.Array:
        """The augmentation levels (B,) in EDM coordinates (0 without augmentation)."""
        if self.aug_max == 0:
            return jnp.zeros((batch,), jnp.float32)
        steps = jax.random.randint(key, (batch,), 0, self.aug_max)
        return vp_sigmas(jnp.asarray(self.aug_alphas_cumprod))[steps]

    def __call__(self, net: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        k_loss, k_drop, k_level, k_noise = jax.random.split(key, 4)
        x = batch["x"]
        context = drop_context(batch["context"], self.null_context, k_drop, self.context_dropout)
        level = self.levels(k_level, x.shape[0])
        up = resize_align_corners(batch["low"], x.shape[1:3])
        extra = up + level[:, None, None, None] * jax.random.normal(k_noise, up.shape, up.dtype)
        den = DiscreteVPDenoiser(Concat(SuperResolutionNet(net, self.aug_alphas_cumprod), extra), self.alphas_cumprod,
                                 prediction=self.prediction)
        return self.loss(den, x, k_loss, {CONTEXT: context, NOISE_LEVEL: level}), {}


def alphas_cumprod() -> jnp.ndarray:
    return jnp.asarray(training_schedule({"_class_name": "DDPMScheduler", **SCHEDULE}).alphas_cumprod, jnp.float32)


def unet_config(run: str, cross_attention_dim: int) -> dict[str, Any]:
    return {"_class_name": "UNet2DConditionModel", **(BASE_UNET if run == "base" else SR_UNET),
            "cross_attention_dim": cross_attention_dim}


def build(run: str, cross_attention_dim: int) -> UNet2DConditionModel:
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_config(run, cross_attention_dim).items()
           if k != "_class_name"}
    return UNet2DConditionModel(UNet2DConditionConfig(**cfg), rngs=nnx.Rngs(SEED))


def schedule(run: str) -> dict[str, Any]:
    """The run's training schedule as diffusers' scheduler keys (its ``prediction_type`` included)."""
    return {**SCHEDULE, "prediction_type": PREDICTION[run]}


def objective(run: str, null_context: np.ndarray) -> Any:
    """Epsilon regression (Ho et al. eq. 14) or v regression (Salimans & Ho 2022) by the run's prediction."""
    ac, prediction = alphas_cumprod(), PREDICTION[run]
    loss = ddpm_loss(ac) if prediction == "epsilon" else v_loss(ac)
    if run == "base":
        return BaseObjective(loss, ac, jnp.asarray(null_context), prediction=prediction)
    return SuperResolutionObjective(loss, ac, ac, jnp.asarray(null_context), aug_max=AUG_MAX if run == "sr" else 0,
                                    prediction=prediction)


def setup(run: str, data: dict[str, np.ndarray], null_context: np.ndarray, steps: int,
          batch_size: int = BATCH) -> tuple[Trainer, Any, ArrayDataset]:
    """The run's trainer, initial state and data set (``x`` the 8x8 or 32x32 images)."""
    if run not in STEPS:
        raise SystemExit(f"unknown run {run!r}; valid: {', '.join(RUNS)}")
    model = build(run, int(data["context"].shape[-1]))
    x = data["low"] if run == "base" else data["high"]
    arrays = {"x": x, "context": data["context"]} if run == "base" else {"x": x, "low": data["low"],
                                                                          "context": data["context"]}
    lr, warmup = OPTIMISER[run]
    opt = OptimizerConfig(learning_rate=lr, warmup_steps=warmup, schedule="cosine", final_lr_fraction=0.05,
                          clip_norm=1.0, total_steps=max(steps, warmup + 1))
    trainer, state = Trainer.create(model, objective(run, null_context), opt, sample_shape=x.shape[1:], seed=SEED,
                                    ema_decay=EMA, ema_warmup=True)
    return trainer, state, ArrayDataset(arrays, batch_size=min(batch_size, len(x)), seed=SEED)


def zero_variance_half(model: UNet2DConditionModel) -> UNet2DConditionModel:
    """Zero the output convolution's variance channels (the untrained second half of IF's six outputs)."""
    conv = model.conv_out
    c = conv.kernel.value.shape[-1] // 2
    conv.kernel.value = conv.kernel.value.at[..., c:].set(0.0)
    conv.bias.value = conv.bias.value.at[c:].set(0.0)
    return model


def train(run: str, work: Path, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one run and write ``work/<run>/unet`` (float32) and ``work/<run>/training.json``."""
    steps = STEPS[run] if steps is None else steps
    start = time.perf_counter()
    data = training_data(load_digits_text()["train"])
    null = text_states([""])[0]
    trainer, state, dataset = setup(run, data, null, steps, BATCH_SIZE[run])
    prep = time.perf_counter() - start
    state, fitted = fit_recorded(trainer, state, dataset, steps, progress=progress, trace_every=100)
    model = zero_variance_half(nnx.merge(trainer.graphdef, state.ema, state.buffers))
    out = work / run
    save_pretrained(model, out / "unet", unet_config(run, int(data["context"].shape[-1])),
                    class_name="UNet2DConditionModel", library="diffusers")
    trace = fitted.pop("loss_trace")
    record = {"run": run, **fitted, "precompute_seconds": round(prep, 1),
              "parameters": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params)),
              "augmentation": {"aug_max": AUG_MAX if run == "sr" else 0} if run != "base" else None,
              "recipe": {"seed": SEED, "lr": OPTIMISER[run][0], "warmup": OPTIMISER[run][1], "ema": EMA, "context_dropout": CONTEXT_DROPOUT,
                         "schedule": schedule(run), "unet": unet_config(run, int(data["context"].shape[-1]))},
              "data": "jaxdiff.data.load_digits_text()['train'] (6,000 captioned 32x32 colour digits); "
                      "8x8 = 4x4 block means", "cpu_count": os.cpu_count(),
              "affinity": len(os.sched_getaffinity(0)), "loss_trace": trace}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# --------------------------------------------------------------------------------------- folders

def ddpm_scheduler(**extra: Any) -> dict[str, Any]:
    """diffusers' ``DDPMScheduler`` config on the training schedule (IF's settings for the sampling ones)."""
    from jaxdiff.convert.export import _version

    return {"_class_name": "DDPMScheduler", "_diffusers_version": _version("diffusers"), **SCHEDULE,
            "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
            "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.0, "timestep_spacing": "leading",
            "steps_offset": 0, "rescale_betas_zero_snr": False, "trained_betas": None, **extra}


def model_index(stage: int) -> dict[str, Any]:
    from jaxdiff.convert.export import _version

    common = {"_diffusers_version": _version("diffusers"), "feature_extractor": [None, None],
              "safety_checker": [None, None], "watermarker": [None, None], "requires_safety_checker": False,
              "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"]}
    if stage == 1:
        return {"_class_name": "IFPipeline", **common, "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"]}
    return {"_class_name": "IFSuperResolutionPipeline", **common, "text_encoder": [None, None],
            "tokenizer": [None, None], "image_noising_scheduler": ["diffusers", "DDPMScheduler"]}


def write_unet(src: Path, dst: Path) -> None:
    """Copy a run's U-Net in float16 (diffusers' layout and names)."""
    model = load_model_folder(src)
    config = json.loads((src / "config.json").read_text())
    save_pretrained(model, dst, config, class_name="UNet2DConditionModel", library="diffusers", dtype=jnp.float16)


def write_stage(folder: Path, stage: int, run_dir: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_unet(run_dir / "unet", folder / "unet")
    (folder / "scheduler").mkdir()
    trained = json.loads((run_dir / "training.json").read_text())["recipe"]["schedule"]
    prediction = trained.get("prediction_type", "epsilon")
    sched = ddpm_scheduler(thresholding=True, prediction_type=prediction, **({"sample_max_value": 1.5} if stage == 1 else {}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    if stage == 1:
        clip = builtin.builtin_folder("digits-clip")
        save_pretrained(load_model_folder(clip, class_name="CLIPTextModel"), folder / "text_encoder")
        (folder / "tokenizer").mkdir()
        for f in TOKENIZER_FILES:
            if (clip / f).exists():
                shutil.copy2(clip / f, folder / "tokenizer" / f)
    else:
        (folder / "image_noising_scheduler").mkdir()
        (folder / "image_noising_scheduler" / "scheduler_config.json").write_text(
            json.dumps(ddpm_scheduler(clip_sample=False, prediction_type="epsilon"), indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(model_index(stage), indent=2) + "\n")
    shutil.copy2(run_dir / "training.json", folder / "training.json")


def megabytes(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


def install(work: Path, assets: Path = ASSETS, ablation: Path = ABLATION) -> dict[str, Any]:
    """Write the built-in cascade folder and the ablation's super-resolution stage from finished runs."""
    for run in RUNS:
        if not (work / run / "unet" / "config.json").exists():
            raise FileNotFoundError(f"{work / run} is missing: train it first (python examples/cascade/train.py {run})")
    write_stage(assets / "stage_1", 1, work / "base")
    write_stage(assets / "stage_2", 2, work / "sr")
    (assets / "cascade.json").write_text(json.dumps(
        {"stages": ["stage_1", "stage_2"], "sampling": SAMPLING}, indent=2) + "\n")
    write_stage(ablation / "stage_2", 2, work / "sr-noaug")
    return {"digits-cascade": {"folder": str(assets), "megabytes": megabytes(assets)},
            "digits-cascade-no-aug": {"folder": str(ablation), "megabytes": megabytes(ablation)}}


SAMPLING = {"sampler": "DDPM (fixed_small)", "steps": [50, 50], "guidance": [4.0, 1.0], "noise_level": 100,
            "thresholding": ["dynamic", "dynamic"], "dynamic_thresholding_ratio": 0.95, "sample_max_value": [1.5, 1.0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", default=None, help=f"runs to train (default: all of {', '.join(RUNS)})")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: each run's STEPS)")
    p.add_argument("--work", type=Path, default=WORK, help="where runs are written")
    p.add_argument("--install", action="store_true", help="assemble digits-cascade and the ablation from --work")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.install and not args.runs:
        print(json.dumps(install(args.work), indent=1))
        return
    for run in args.runs or RUNS:
        rec = train(run, args.work, args.steps, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("loss_trace", "recipe")}), flush=True)
    if args.install:
        print(json.dumps(install(args.work), indent=1))


if __name__ == "__main__":
    main()
