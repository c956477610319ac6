"""The ``prior`` stage of examples/unclip/train.py: unCLIP's diffusion prior (Ramesh et al. 2022, sec. 2.2) on digits.

A ``PriorTransformer`` reads the caption's digits-clip text embedding (unit norm) and text states and predicts the
clean image embedding ``z_i`` (the unit digits-clip image embedding of the caption's image, standardised per
dimension with the training set's mean and std, which the folder stores as ``clip_mean`` / ``clip_std``) from its
noised version: ``L = E ||f(z_i^t, t, y) - z_i||^2`` on the squared-cosine betas (``x0_loss``). With probability
``text_dropout`` the caption is replaced by the empty prompt's encoding (classifier-free guidance).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.convert.export import save_pretrained
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import DenoisingLoss, DiscreteVPLevels, x0_loss
from jaxdiff.models._pure import PureModel
from jaxdiff.models.prior import PriorNet, PriorTransformer, PriorTransformerConfig
from jaxdiff.pipelines import unclip_digits as ud
from jaxdiff.pipelines.schedulers import training_schedule
from jaxdiff.train import ArrayDataset, Trainer
from jaxdiff.train.objectives import _check_template, _with_net

import train as _train  # noqa: E402  (examples/unclip/train.py: recipes, the fit loop)

Array = jax.Array
TEXT_KEYS = ("text_embeds", "text_states", "text_mask")


def scheduler_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) on the prior's training betas, x0 prediction."""
    return {"_class_name": "DPMSolverMultistepScheduler", **cfg["scheduler"], "algorithm_type": "dpmsolver++",
            "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "thresholding": False,
            "timestep_spacing": "trailing", "steps_offset": 0, "use_karras_sigmas": False, "trained_betas": None}


def text_conditioning(texts: list[str]) -> dict[str, np.ndarray]:
    """digits-clip's encoding of ``texts`` (:func:`jaxdiff.pipelines.unclip_digits.encode_text`) as numpy arrays."""
    from jaxdiff.builtin import load_clip

    clip, tok = load_clip(ud.CLIP_FROM)
    ids = ud.tokenize(tok, texts, int(clip.config.text_config.max_position_embeddings))
    pure = PureModel.of(clip)
    fn = jax.jit(lambda m, i: ud.encode_text(m, i))
    parts = [jax.device_get(fn(pure, jnp.asarray(ids[i:i + 512]))) for i in range(0, len(ids), 512)]
    return {k: np.concatenate([p[k] for p in parts]) for k in TEXT_KEYS}


@pytree_dataclass
class PriorObjective:
    """x0 regression of the prior; each caption becomes ``null`` (the empty prompt's ``text_*`` arrays, no batch
    axis) with probability ``dropout``. Batches: ``"x"`` (B, d) standardised image embeddings and the text keys."""

    loss: DenoisingLoss
    denoiser: Any
    null: dict
    dropout: float = 0.1

    needs_labels = False
    batch_keys = ("x",) + TEXT_KEYS

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")

    def denoiser_for(self, net: Callable[..., Array]) -> Any:
        return _with_net(self.denoiser, PriorNet(net))

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        k_loss, k_drop = jax.random.split(key)
        drop = jax.random.bernoulli(k_drop, jnp.asarray(self.dropout, jnp.float32), (batch["x"].shape[0],))
        cond = {}
        for k in TEXT_KEYS:
            v, null = batch[k], jnp.asarray(self.null[k])
            cond[k] = jnp.where(drop.reshape((-1,) + (1,) * (v.ndim - 1)), null.astype(v.dtype)[None], v)
        return self.loss(self.denoiser_for(net), batch["x"], k_loss, cond), {}


def train_prior(cfg: dict[str, Any], arrays: dict[str, np.ndarray], null: dict[str, np.ndarray], *,
                steps: int | None = None, progress: bool = True) -> tuple[PriorTransformer, dict[str, Any]]:
    """Train on ``arrays`` (``x`` standardised embeddings + the text keys); returns the EMA prior."""
    steps = cfg["steps"] if steps is None else steps
    ac = jnp.asarray(training_schedule(scheduler_config(cfg)).alphas_cumprod, jnp.float32)
    model = PriorTransformer(PriorTransformerConfig.from_dict(cfg["model"]), rngs=nnx.Rngs(cfg["seed"]))
    objective = PriorObjective(x0_loss(DiscreteVPLevels(ac)), DiscreteVPDenoiser(None, ac, "sample"),
                               {k: jnp.asarray(v) for k, v in null.items()}, cfg["text_dropout"])
    trainer, state = Trainer.create(model, objective, _train._optimizer(cfg, steps), sample_shape=arrays["x"].shape[1:],
                                    seed=cfg["seed"], ema_decay=cfg["ema_decay"], ema_warmup=True)
    dataset = ArrayDataset(arrays, batch_size=min(cfg["batch_size"], len(arrays["x"])), seed=cfg["seed"])
    state, record = _train._fit(trainer, state, dataset, steps, progress)
    return nnx.merge(trainer.graphdef, state.ema, state.buffers), record


def run_prior(cfg: dict[str, Any], data: dict[str, Any], out: Path, *, steps: int | None, progress: bool) -> dict:
    split = data["train"]
    start = time.perf_counter()
    z = ud.image_embeddings(ud.load_image_encoder(), split["image"])
    mean, std = z.mean(0, keepdims=True), z.std(0, keepdims=True)
    text = text_conditioning([str(c) for c in split["caption"]])
    null = {k: v[0] for k, v in text_conditioning([""]).items()}
    arrays = {"x": ((z - mean) / std).astype(np.float32), **text}
    prep = time.perf_counter() - start
    prior, record = train_prior(cfg, arrays, null, steps=steps, progress=progress)
    prior.clip_mean[...] = jnp.asarray(mean, jnp.float32)  # the standardisation, stored as diffusers' buffers
    prior.clip_std[...] = jnp.asarray(std, jnp.float32)
    save_pretrained(prior, out / "prior", dataclasses.asdict(prior.config), class_name="PriorTransformer",
                    library="diffusers", dtype=jnp.float16)
    (out / "prior" / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg), indent=2) + "\n")
    return {"parameters": _train._count(prior), "precompute_seconds": round(prep, 1), "training": record,
            "recipe": {k: v for k, v in cfg.items() if k[0] != "_"}}
