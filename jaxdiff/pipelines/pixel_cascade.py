"""Imagen / DeepFloyd IF-style pixel cascades as :mod:`jaxdiff.pipelines.cascade` stages.

A text-conditioned base U-Net samples a small image; a super-resolution U-Net reads the upsampled base
output, noised to an augmentation level, as extra input channels and the level as its class embedding
(Saharia et al. 2022, "Imagen", §2.5 noise-conditioning augmentation; Ho et al. 2022, "Cascaded Diffusion
Models", §3.2). The networks follow DeepFloyd IF's conventions (diffusers' ``IFPipeline`` /
``IFSuperResolutionPipeline``): ``UNet2DConditionModel`` s whose output has twice the image channels (noise
prediction, then variance values), the low-resolution image upsampled bilinearly with aligned corners and
noised by the ``image_noising_scheduler`` (``sqrt(abar_t) x + sqrt(1 - abar_t) n``) at the integer level
``t`` that is also passed as ``class_labels``.

The cascade core adds the augmentation in EDM coordinates, ``up + sigma n``; :class:`SuperResolutionNet`
maps that to IF's coordinates exactly (``sigma = sqrt((1 - abar_t) / abar_t)``, so dividing by
``sqrt(1 + sigma^2)`` gives IF's noised image and ``t`` is the step whose sigma it is).
:func:`load_cascade` reads a cascade folder (``stage_1/`` an ``IFPipeline`` folder, ``stage_2/`` an
``IFSuperResolutionPipeline`` folder) and :func:`cascade_stages` builds the stages for prompts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, samplers, schedules
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform
from jaxdiff.denoisers import DiscreteVPDenoiser, sigma_to_discrete_t
from jaxdiff.models._pure import PureModel
from jaxdiff.pipelines import cascade as C
from jaxdiff.pipelines.schedulers import training_schedule

Array = jax.Array
CONTEXT = "context"


@pytree_dataclass
class TextNet:
    """``net(x, t, {"context": ...}) -> eps``: a text-conditioned U-Net whose output's first ``channels``
    channels are the noise prediction (IF's U-Nets append as many variance channels, ignored here)."""

    unet: Callable[..., Array]
    channels: int = static_field(default=3)

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        return self.unet(x, t, cond[CONTEXT])[..., :self.channels]


@pytree_dataclass
class SuperResolutionNet:
    """IF's super-resolution network call from the cascade's: ``x`` holds the sample's ``channels`` channels then
    the upsampled low-resolution image noised in EDM coordinates, ``up + sigma n``; ``cond["noise_level"]`` is
    that sigma (B,). The image is rescaled to ``(up + sigma n) / sqrt(1 + sigma^2)`` (IF's ``add_noise``) and the
    level converted to its step ``t`` on ``aug_alphas_cumprod`` (the image-noising schedule), handed to the U-Net
    as ``class_labels`` (``class_embed_type="timestep"``)."""

    unet: Callable[..., Array]
    aug_alphas_cumprod: Array
    channels: int = static_field(default=3)

    def level_step(self, sigma: Array) -> Array:
        """The image-noising step of each level (B,): 0 for no augmentation, ``t`` for ``sigma_t``."""
        return sigma_to_discrete_t(sigma, schedules.vp_sigmas(jnp.asarray(self.aug_alphas_cumprod)))

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        sigma = jnp.broadcast_to(jnp.asarray(cond[C.NOISE_LEVEL], jnp.float32), (x.shape[0],))
        c = self.channels
        if x.shape[-1] != 2 * c:
            raise ValueError(f"the super-resolution network reads {c} sample channels and {c} low-resolution "
                             f"channels, got {x.shape[-1]}; give the stage the previous stage's {c}-channel output")
        low = x[..., c:] * jax.lax.rsqrt(1.0 + sigma * sigma)[:, None, None, None].astype(x.dtype)
        inp = jnp.concatenate([x[..., :c], low], axis=-1)
        return self.unet(inp, t, cond[CONTEXT], class_labels=self.level_step(sigma))[..., :c]


def level_sigma(step: Any, aug_alphas_cumprod: Any) -> Array:
    """The EDM-coordinate augmentation level of IF's integer ``noise_level`` step: ``sqrt((1 - abar) / abar)``."""
    return schedules.vp_sigmas(jnp.asarray(aug_alphas_cumprod))[jnp.asarray(step, jnp.int32)]


# ------------------------------------------------------------------------------------------- folder

@pytree_dataclass
class CascadeModels:
    """The networks of a two-stage cascade folder as pure pytrees with their schedules."""

    base: PureModel
    sr: PureModel
    text_encoder: PureModel
    base_alphas_cumprod: Array
    sr_alphas_cumprod: Array
    aug_alphas_cumprod: Array
    base_shape: tuple = static_field()
    sr_shape: tuple = static_field()
    max_length: int = static_field(default=77)
    tokenizer: Any = static_field(default=None)
    predictions: tuple = static_field(default=("epsilon", "epsilon"))

    def encode(self, prompts: Sequence[str]) -> Array:
        """Prompts -> text states (N, L, D): ids padded to the tower's length (EOS padding, no attention mask)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True).input_ids
        return self.text_encoder.bind("hidden_state")(jnp.asarray(np.asarray(ids, np.int32)), -1, True)


def _scheduler(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "scheduler_config.json").read_text())


def load_cascade(folder: str | Path) -> CascadeModels:
    """Read a cascade folder: ``stage_1/`` (``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``) and
    ``stage_2/`` (``unet/``, ``scheduler/``, ``image_noising_scheduler/``), weights in float32."""
    from jaxdiff.convert.folders import load_model_folder
    from jaxdiff.models.tokenizers import load_tokenizer

    folder = Path(folder)
    s1, s2 = folder / "stage_1", folder / "stage_2"
    for need in (s1 / "unet", s1 / "text_encoder", s1 / "tokenizer", s2 / "unet", s2 / "image_noising_scheduler"):
        if not need.is_dir():
            raise FileNotFoundError(f"{need} is missing: a cascade folder holds stage_1/ (an IFPipeline folder) and "
                                    "stage_2/ (an IFSuperResolutionPipeline folder)")
    base = load_model_folder(s1 / "unet")
    sr = load_model_folder(s2 / "unet")
    text = load_model_folder(s1 / "text_encoder")
    b, s = base.config, sr.config
    t1, t2, noising = (training_schedule(_scheduler(f)) for f in
                       (s1 / "scheduler", s2 / "scheduler", s2 / "image_noising_scheduler"))
    ac = lambda t: jnp.asarray(t.alphas_cumprod, jnp.float32)  # noqa: E731
    return CascadeModels(
        PureModel.of(base), PureModel.of(sr), PureModel.of(text, "hidden_state"), ac(t1), ac(t2), ac(noising),
        (b.sample_size, b.sample_size, b.in_channels), (s.sample_size, s.sample_size, s.in_channels // 2),
        int(text.config.max_position_embeddings), load_tokenizer(s1 / "tokenizer"), (t1.prediction, t2.prediction))


def threshold_transform(kind: str, ratio: float = 0.95, max_value: float = 1.5) -> Any:
    """``"dynamic"`` (Imagen's percentile thresholding, IF's settings), ``"static"`` (clip x0 to [-1, 1]) or
    ``"none"``."""
    if kind == "dynamic":
        return guidance.dynamic_threshold(ratio, max_value)
    if kind == "static":
        return guidance.static_threshold(-1.0, 1.0)
    if kind == "none":
        return None
    raise ValueError(f"unknown thresholding {kind!r}; valid: dynamic, static, none")


def _guidance(scale: Any, uncond: Array) -> Any:
    """Classifier-free guidance toward the caption (None: the conditional network alone, half the batch)."""
    return None if scale is None else guidance.classifier_free(scale, {CONTEXT: uncond})


def _sampler(threshold: str, ratio: float, max_value: float) -> samplers.DDPM:
    return samplers.DDPM("fixed_small", threshold_transform(threshold, ratio, max_value))


def cascade_stages(m: CascadeModels, context: Array, uncond: Array, *, steps: Sequence[Any] = (50, 50),
                   guidance_scales: Sequence[Any] = (4.0, 1.0), noise_level: Any = 100,
                   thresholds: Sequence[str] = ("dynamic", "dynamic"), threshold_ratio: float = 0.95,
                   max_values: Sequence[float] = (1.5, 1.0), sr_network: Any = None,
                   capacity: int = 64) -> tuple[C.Stage, C.Stage]:
    """Base and super-resolution :class:`~jaxdiff.pipelines.cascade.Stage` s for text states ``context``
    (B, L, D) with the empty prompt's ``uncond`` (L, D): DDPM ancestral sampling (``fixed_small`` variance) on
    each stage's ``leading``-spaced training steps, classifier-free guidance then thresholding on x0, the
    super-resolution input upsampled with aligned corners and augmented at IF's integer ``noise_level``.
    Step counts, scales and the level are runtime values (one compiled program; a scale of None drops that stage's
    guidance, a different program); ``sr_network`` replaces the
    second stage's U-Net (an ablation's)."""
    sr = m.sr if sr_network is None else sr_network
    uncond = jnp.broadcast_to(uncond, context.shape)
    sig1 = schedules.vp_discrete(steps[0], m.base_alphas_cumprod, "leading", 0, capacity=capacity)
    sig2 = schedules.vp_discrete(steps[1], m.sr_alphas_cumprod, "leading", 0, capacity=capacity)
    base = C.Stage(TextNet(m.base), _sampler(thresholds[0], threshold_ratio, max_values[0]), sig1, m.base_shape,
                   denoiser=vp_denoiser(m.base_alphas_cumprod, m.predictions[0]), cond={CONTEXT: context},
                   transform=_guidance(guidance_scales[0], uncond))
    up = C.Stage(SuperResolutionNet(sr, m.aug_alphas_cumprod), _sampler(thresholds[1], threshold_ratio, max_values[1]),
                 sig2, m.sr_shape, denoiser=vp_denoiser(m.sr_alphas_cumprod, m.predictions[1]), cond={CONTEXT: context},
                 transform=_guidance(guidance_scales[1], uncond),
                 augment=level_sigma(noise_level, m.aug_alphas_cumprod), upsample=C.ALIGN_CORNERS)
    return base, up


def vp_denoiser(alphas_cumprod: Array, prediction: str) -> Transform:
    """The stage's ``net -> DiscreteVPDenoiser(net, alphas_cumprod, prediction=...)`` (the scheduler's
    ``prediction_type``: ``epsilon``, ``v_prediction`` or ``sample``)."""
    return Transform(DiscreteVPDenoiser, {"alphas_cumprod": alphas_cumprod}, (("prediction", prediction),))
