"""Training a LoRA (Hu et al. 2021) on a frozen Stable Diffusion U-Net with :class:`jaxdiff.train.Trainer`.

Only the low-rank factors train: :class:`LoRALayers` is a small NNX module holding ``down`` (in, r) and ``up``
(r, out) per chosen kernel (``up`` starts at zero, ``down`` uniform in +-1/sqrt(fan_in), as peft initialises
``lora_A`` / ``lora_B``, so training starts at the base model); calling it returns the
:class:`jaxdiff.models.patches.Patch`. :class:`LoRAObjective` holds the frozen U-Net as a pytree (traced,
never differentiated, so nothing but the factors can change: no optimiser mask needed) and runs
Stable Diffusion's loss (Rombach et al. 2022, eq. 3) through the U-Net patched by the factors::

    trainer, state = lora_trainer(sd, rank=4, sample_shape=latents.shape[1:])
    state = fit(trainer, state, ArrayDataset({"x": latents, "context": context}, batch_size=16), steps)
    adapter = trained_lora(trainer, state)          # a jaxdiff.lora.LoRA
    save_lora("style.safetensors", adapter, "kohya")  # jaxdiff.convert.lora_export
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.convert.torch_layout import checkpoint_name
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import DenoisingLoss, ddpm_loss
from jaxdiff.models import patches as P
from jaxdiff.models._pure import PureModel
from jaxdiff.train.objectives import TextDiffusionObjective, _check_template, _with_net
from jaxdiff.train.optim import OptimizerConfig
from jaxdiff.train.step import Trainer, TrainState

Array = jax.Array
ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
"""The default targets: every attention projection (diffusers' ``train_text_to_image_lora.py``)."""


def lora_targets(model: PureModel, pattern: str = ATTENTION) -> list[str]:
    """State names of the kernels whose module (checkpoint name without ``.weight``) matches ``pattern``."""
    names = [n for n in P._params(model.state) if n.endswith(".kernel")]
    found = sorted(n for n in names if re.search(pattern, checkpoint_name(n)[: -len(".weight")]))
    if not found:
        raise ValueError(f"no Linear / Conv kernel of the model matches {pattern!r} (module names as in diffusers, "
                         "e.g. 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q')")
    return found


class LoRALayers(nnx.Module):
    """Trainable LoRA factors for the kernels ``targets`` (state names) of a frozen model; ``__call__`` -> Patch."""

    def __init__(self, model: PureModel, rank: int, *, targets: str | list[str] = ATTENTION,
                 alpha: float | None = None, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        names = lora_targets(model, targets) if isinstance(targets, str) else list(targets)
        params = P._params(model.state)
        missing = [checkpoint_name(n) for n in names if n not in params]
        if missing:
            raise ValueError(f"the model has no kernel(s) {missing[:5]}")
        downs, ups = [], []
        for name in names:
            shape = tuple(params[name].shape)  # (in, out) or (kh, kw, in, out)
            bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
            downs.append(nnx.Param(jax.random.uniform(rngs.params(), (*shape[:-1], rank), jnp.float32, -bound, bound)))
            ups.append(nnx.Param(jnp.zeros((rank, shape[-1]), jnp.float32)))
        self.names = tuple(names)
        self.down = nnx.List(downs)
        self.up = nnx.List(ups)
        self.alpha = float(alpha if alpha is not None else rank)

    def __call__(self) -> P.Patch:
        alpha = jnp.asarray(self.alpha, jnp.float32)
        return P.Patch({n: P.LowRank(d[...], u[...], alpha) for n, d, u in zip(self.names, self.down, self.up)}, {})


@pytree_dataclass
class LoRAObjective:
    """Stable Diffusion's denoising loss through the frozen ``base`` U-Net patched by the trained LoRA.

    As :class:`jaxdiff.train.TextDiffusionObjective` (batches: ``"x"`` scaled latents, ``"context"`` (B, L, D)
    text states; ``context_dropout`` replaces captions by ``null_context``), with the network being trained a
    :class:`LoRALayers` whose patch is applied to ``base`` (a ``PureModel``) at every call."""

    loss: DenoisingLoss
    denoiser: Any
    base: Any
    null_context: Array
    context_dropout: float = 0.1

    needs_labels = False
    batch_keys = ("x", "context")

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")

    def network(self, lora_net: Callable[[], P.Patch]) -> P.PatchedModel:
        """The base U-Net patched by ``lora_net()`` at scale 1."""
        return P.PatchedModel(self.base, (lora_net(),), (jnp.ones((), jnp.float32),))

    def denoiser_for(self, lora_net: Callable[[], P.Patch]) -> Any:
        return _with_net(self.denoiser, self.network(lora_net))

    def __call__(self, net: Callable[[], P.Patch], batch: dict, key: Array) -> tuple[Array, dict]:
        text = TextDiffusionObjective(self.loss, self.denoiser, self.null_context, self.context_dropout)
        return text(self.network(net), batch, key)


def lora_trainer(sd: Any, rank: int = 4, *, sample_shape: tuple[int, ...] | None = None, targets: Any = ATTENTION,
                 alpha: float | None = None, optimizer: OptimizerConfig | None = None, context_dropout: float = 0.1,
                 seed: int = 0, ema_decay: float = 0.0, **trainer_kwargs: Any) -> tuple[Trainer, TrainState]:
    """(Trainer, initial state) training a rank-``rank`` LoRA of ``sd``'s U-Net (its text encoder stays frozen:
    batches carry its states). ``sample_shape``: the latents' (h, w, c), default from ``sd.default_size``."""
    m = sd.models
    unet = m.unet.base if isinstance(m.unet, P.PatchedModel) else m.unet
    ac = jnp.asarray(sd.train.alphas_cumprod, jnp.float32)
    null = np.asarray(sd.encode_prompt([""]))[0]
    objective = LoRAObjective(ddpm_loss(ac) if m.prediction == "epsilon" else _v_loss(ac),
                              DiscreteVPDenoiser(None, ac, m.prediction), unet, jnp.asarray(null), context_dropout)
    layers = LoRALayers(unet, rank, targets=targets, alpha=alpha, rngs=nnx.Rngs(seed))
    if sample_shape is None:
        f = m.vae_factor
        sample_shape = (sd.default_size // f, sd.default_size // f, m.latent_channels)
    return Trainer.create(layers, objective, optimizer or OptimizerConfig(1e-4), sample_shape=sample_shape,
                          seed=seed, ema_decay=ema_decay, **trainer_kwargs)


def _v_loss(ac: Array) -> DenoisingLoss:
    from jaxdiff.losses import v_loss

    return v_loss(ac)


def trained_lora(trainer: Trainer, state: TrainState, *, ema: bool = False, name: str = "lora") -> Any:
    """The trained factors as a :class:`jaxdiff.lora.LoRA` (U-Net only), ready to apply, fuse or save."""
    from jaxdiff.lora import LoRA

    patch = jax.tree_util.tree_map(np.asarray, trainer.model(state, ema)())
    return LoRA(unet=jax.tree_util.tree_map(jnp.asarray, patch), name=name)
