"""unCLIP / DALL-E 2 (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents"):
a diffusion prior from the CLIP text embedding to a CLIP image embedding, a decoder conditioned on that image
embedding, and super-resolution, all three stages in one compiled program (:mod:`jaxdiff.pipelines.cascade`).

Loads diffusers' ``UnCLIPPipeline`` folders (karlo: ``prior``, ``text_proj``, ``decoder``, ``super_res_first``,
``super_res_last``, ``text_encoder``, ``tokenizer`` and three ``UnCLIPScheduler`` configs) and
``UnCLIPImageVariationPipeline`` folders (``image_encoder`` instead of the prior). The stages, as diffusers runs them:

1. **Prior** (Sec. 2.2): :class:`~jaxdiff.models.prior.PriorTransformer` predicts the clean standardised image
   embedding (``prediction_type="sample"``), classifier-free guided against the empty prompt, x0 clipped to
   ``clip_sample_range``, DDPM ancestral steps; then ``post_process_latents`` (``* clip_std + clip_mean``).
   Image variations skip it and use an input image's CLIP embedding.
2. **Decoder** (Sec. 2.1): :class:`~jaxdiff.models.unclip_text_proj.UnCLIPTextProjModel` turns the image embedding
   into extra context tokens and an addition to the time embedding (``class_labels``); the 64x64 pixel U-Net
   predicts noise and a variance interpolation (``learned_range``); guidance on the mean only, the null image
   embedding and the empty prompt as the unconditional half; the result clamped to [-1, 1].
3. **Super-resolution**: the decoder image upsampled bicubically (``jax.image.resize`` ``"cubic"``, equal to
   PyTorch's antialiased bicubic upsampling) and concatenated to the sample; ``super_res_first`` for every step
   but the last, ``super_res_last`` for the last (:class:`LastStepSwitch`); no guidance.

``UnCLIPScheduler`` is DDPM with its own timesteps ``round(i (T-1)/(n-1))`` (the ``linspace`` spacing) moving to
the next listed timestep (``prev_timestep``), ``clip_sample`` on x0 and, for ``learned_range``, Nichol &
Dhariwal's eq. 15 variance of that move: the same formula as ``DDPMScheduler`` with ``variance_type=
"learned_range"`` (which clamps ``beta_tilde`` at 1e-20, a difference only on the noiseless last step).
:func:`scheduler_plan` maps it onto :class:`jaxdiff.samplers.DDPM` through
:func:`jaxdiff.pipelines.schedulers.plan`. Step counts, guidance scales, prompts and embeddings are traced values
of :class:`UnCLIPInputs`: changing them compiles nothing new.

:func:`slerp` interpolates two image embeddings on the sphere (the paper's Sec. 3.2 "interpolations"), which
:meth:`UnCLIP.interpolate` decodes.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, sampling, schedules
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.conditioning import Transform
from jaxdiff.denoisers import DiscreteVPDenoiser, sigma_to_discrete_t
from jaxdiff.models._pure import PureModel
from jaxdiff.models.prior import PriorNet
from jaxdiff.models.unclip_text_proj import decoder_mask
from jaxdiff.pipelines import cascade
from jaxdiff.pipelines import schedulers as _sched

Array = jax.Array

TEXT_TO_IMAGE = ("prior", "decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder", "tokenizer",
                 "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
VARIATION = ("decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder", "tokenizer",
             "image_encoder", "decoder_scheduler", "super_res_scheduler")
PRIOR, DECODER, SUPER_RES = 0, 1, 2  # stage indices: stage i samples with the key fold_in(key, i)
DEFAULT_CAPACITY = 256  # schedule capacity: any step count up to it shares one compiled program


# ---- networks in net(x, t, cond) form --------------------------------------------------------------------------

@pytree_dataclass
class DecoderNet:
    """The decoder U-Net as ``net(x, t, cond)``: ``cond`` holds ``context`` (image tokens + projected text),
    ``class_labels`` (the additive CLIP time embedding) and ``mask`` (the context mask)."""

    unet: Any

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        return self.unet(x, t, cond["context"], class_labels=cond["class_labels"],
                         encoder_attention_mask=cond["mask"])


@pytree_dataclass
class PixelNet:
    """An unconditional pixel U-Net (``UNet2DModel``) as ``net(x, t, cond)`` (``cond`` unused)."""

    unet: Any

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        return self.unet(x, t)


@pytree_dataclass
class LastStepSwitch:
    """``last(x, t, cond)`` at the last step of the schedule (``t <= last_t``), else ``first``: unCLIP's
    ``super_res_last`` / ``super_res_first``. One ``lax.cond``, so only one network runs per step."""

    first: Any
    last: Any
    last_t: Array

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        is_last = jnp.max(jnp.asarray(t)) <= self.last_t + 0.5
        return jax.lax.cond(is_last, lambda: self.last(x, t, cond), lambda: self.first(x, t, cond))


# ---- schedules ---------------------------------------------------------------------------------------------

def scheduler_plan(config: Mapping[str, Any], steps: int, capacity: int = DEFAULT_CAPACITY
                   ) -> tuple[_sched.TrainingSchedule, _sched.Plan]:
    """Training schedule and :class:`~jaxdiff.pipelines.schedulers.Plan` (DDPM, its variance and x0 clip, the
    timesteps of ``set_timesteps(steps)``) of an ``UnCLIPScheduler`` (or any diffusers scheduler) config."""
    cfg = _sched.unclip_as_ddpm(config)
    if config.get("_class_name") == "UnCLIPScheduler" and int(steps) < 2:
        raise ValueError(f"UnCLIPScheduler needs at least 2 steps (its spacing divides by steps - 1), got {steps}")
    train = _sched.training_schedule(cfg)
    return train, _sched.plan(train, steps, capacity=capacity)


# ---- the request -------------------------------------------------------------------------------------------

@pytree_dataclass
class StageRun:
    """One stage's runtime values: sampler (with its x0 clip), noise levels (traced count) and start noise
    (``N(0, I)`` in VP coordinates, (B, ...) or None: drawn from the stage's key)."""

    sampler: Any
    sigmas: schedules.Sigmas
    start: Any = None


@pytree_dataclass
class UnCLIPInputs:
    """Everything that changes between runs, all traced: the prompt's CLIP text embedding (B, E), last hidden
    states (B, L, E) and mask (B, L), the same for the unconditional prompt, the guidance scales, the three stages'
    :class:`StageRun`, and ``image_embeds`` (B, E) with ``use_image_embeds`` (a traced bool): decode the given
    embeddings instead of the prior's (variations, interpolations; the prior then runs no step). Text-to-image,
    variations and interpolations of a folder with a prior thus share one compiled program. A folder without a
    prior (an image-variation folder) takes ``prior=None`` and always decodes ``image_embeds``."""

    text: dict
    uncond: dict
    prior_scale: Array
    decoder_scale: Array
    prior: Any
    decoder: StageRun
    super_res: StageRun
    image_embeds: Array
    use_image_embeds: Array


@pytree_dataclass
class UnCLIPModels:
    """The networks (pure callables) and training schedules (``*_ac``: ``alphas_cumprod``); the image embedding
    width, the decoder's and super-resolution's sample shapes, prediction types and variance kinds are static."""

    prior: Any  # PureModel of PriorTransformer, or None (variation folders)
    text_proj: Any
    decoder: Any
    super_res_first: Any
    super_res_last: Any
    prior_ac: Any
    decoder_ac: Array
    super_res_ac: Array
    embedding_dim: int = static_field()
    decoder_shape: tuple = static_field()
    super_res_shape: tuple = static_field()
    prior_prediction: str = static_field(default="sample")
    decoder_prediction: str = static_field(default="epsilon")
    super_res_prediction: str = static_field(default="epsilon")
    decoder_learned_variance: bool = static_field(default=True)
    super_res_learned_variance: bool = static_field(default=False)


def _vp(ac: Array, prediction: str, learned: bool = False) -> Transform:
    static = (("prediction", prediction), ("quantize", True), ("learned_variance", learned))
    return Transform(DiscreteVPDenoiser, dict(alphas_cumprod=ac), static)


def run_stage(stage: cascade.Stage, prev: Array | None, key: Array, batch: int, start: Array | None) -> Array:
    """:func:`jaxdiff.pipelines.cascade.run_stage` with an optional given start noise (``N(0, I)``, scaled like the
    drawn one to ``sqrt(sigma_max^2 + sigma_data^2)``); the same key streams."""
    if start is None:
        return cascade.run_stage(stage, prev, key, batch)
    extra = None if prev is None else cascade.augmented(prev, stage, jax.random.fold_in(key, cascade.AUGMENT_STREAM))
    x = jnp.asarray(start, jnp.float32) * jnp.sqrt(stage.sigmas.values[0] ** 2 + stage.sigma_data ** 2)
    out, _ = sampling.sample_jit(cascade.stage_denoiser(stage, extra), stage.sampler, stage.sigmas, x,
                                 jax.random.fold_in(key, cascade.SAMPLER_STREAM), stage.cond, False, 0)
    return out


def last_timestep(sigmas: schedules.Sigmas, ac: Array) -> Array:
    """The (rounded) training timestep of the schedule's last level before 0."""
    last = sigmas.values[sigmas.count - 1]
    return jnp.round(sigma_to_discrete_t(last, schedules.vp_sigmas(jnp.asarray(ac, jnp.float32))))


def stages(m: UnCLIPModels, inp: UnCLIPInputs) -> tuple[Any, cascade.Stage, cascade.Stage]:
    """The prior stage (None for a folder without a prior) and the decoder and super-resolution stages without
    their conditioning (the decoder's depends on the prior's output: :func:`sample` fills it in)."""
    prior = None
    if m.prior is not None:
        if inp.prior is None:
            raise ValueError("this unCLIP folder has a prior: give its StageRun (UnCLIP.plan('prior', steps))")
        sigmas = inp.prior.sigmas
        sigmas = dataclasses.replace(sigmas, count=jnp.where(inp.use_image_embeds, 0, sigmas.count))
        prior = cascade.Stage(PriorNet(m.prior), inp.prior.sampler, sigmas, (m.embedding_dim,),
                              denoiser=_vp(m.prior_ac, m.prior_prediction),
                              transform=guidance.classifier_free(inp.prior_scale, inp.uncond), cond=inp.text,
                              sigma_data=1.0)
    decoder = cascade.Stage(DecoderNet(m.decoder), inp.decoder.sampler, inp.decoder.sigmas, m.decoder_shape,
                            denoiser=_vp(m.decoder_ac, m.decoder_prediction, m.decoder_learned_variance),
                            sigma_data=1.0)
    last_t = last_timestep(inp.super_res.sigmas, m.super_res_ac)
    net = LastStepSwitch(PixelNet(m.super_res_first), PixelNet(m.super_res_last), last_t)
    super_res = cascade.Stage(net, inp.super_res.sampler, inp.super_res.sigmas, m.super_res_shape,
                              denoiser=_vp(m.super_res_ac, m.super_res_prediction, m.super_res_learned_variance),
                              upsample="cubic", augment=jnp.float32(0.0), level_key=None, sigma_data=1.0)
    return prior, decoder, super_res


def decoder_conditioning(m: UnCLIPModels, image_embeds: Array, text: Mapping[str, Array]) -> dict:
    """The decoder's ``cond`` from image embeddings and a prompt's CLIP outputs (:class:`DecoderNet`)."""
    proj = m.text_proj
    context, additive = proj(image_embeds, text["text_embeds"], text["text_states"])
    return dict(context=context, class_labels=additive,
                mask=decoder_mask(text["text_mask"], proj.module().config.clip_extra_context_tokens))


def sample(m: UnCLIPModels, inp: UnCLIPInputs, key: Array, batch: int) -> tuple[Array, Array, Array]:
    """Prior (unless ``inp.use_image_embeds``), decoder, super-resolution: ``(image embeddings (B, E), decoder
    images (B, h, w, 3) and final images (B, H, W, 3), both in [-1, 1])``. Pure: under :data:`sample_jit` one
    program."""
    prior, decoder, super_res = stages(m, inp)
    embeds = jnp.asarray(inp.image_embeds, jnp.float32)
    if prior is not None:
        latents = run_stage(prior, None, jax.random.fold_in(key, PRIOR), batch, inp.prior.start)
        embeds = jnp.where(inp.use_image_embeds, embeds, m.prior.bind("post_process_latents")(latents))
    cond = decoder_conditioning(m, embeds, inp.text)
    null = m.text_proj.bind("null_image_embeddings")(batch)
    uncond = decoder_conditioning(m, null, inp.uncond)
    decoder = dataclasses.replace(decoder, cond=cond, transform=guidance.classifier_free(inp.decoder_scale, uncond))
    small = jnp.clip(run_stage(decoder, None, jax.random.fold_in(key, DECODER), batch, inp.decoder.start), -1.0, 1.0)
    big = run_stage(super_res, small, jax.random.fold_in(key, SUPER_RES), batch, inp.super_res.start)
    return embeds, small, big


sample_jit = jax.jit(sample, static_argnames=("batch",))
"""``sample_jit(models, inputs, key, batch)``: one compiled program per folder, batch and stage structure."""


# ---- interpolation -----------------------------------------------------------------------------------------

def slerp(a: Array, b: Array, w: Any) -> Array:
    """Spherical interpolation (Shoemake 1985) from ``a`` (w = 0) to ``b`` (w = 1) along the last axis:
    ``sin((1-w) theta) / sin(theta) a + sin(w theta) / sin(theta) b`` with ``theta`` the angle between them
    (unCLIP's image-embedding interpolations). ``w`` may be a vector (W,): the result is then (W, ..., D).
    Nearly parallel inputs fall back to linear interpolation."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    w = w.reshape(w.shape + (1,) * a.ndim)
    cos = jnp.sum(a * b, -1, keepdims=True) / (jnp.linalg.norm(a, axis=-1, keepdims=True)
                                                * jnp.linalg.norm(b, axis=-1, keepdims=True))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    small = theta < 1e-4
    s = jnp.where(small, 1.0, jnp.sin(theta))
    wa = jnp.where(small, 1.0 - w, jnp.sin((1.0 - w) * theta) / s)
    wb = jnp.where(small, w, jnp.sin(w * theta) / s)
    return wa * a + wb * b


_slerp = jax.jit(slerp)


# ---- the loaded pipeline -----------------------------------------------------------------------------------

def _start(value: Any, shape: tuple[int, ...], key: Array, stage: int, name: str) -> Array:
    """A stage's start noise: the caller's (NHWC, or NCHW as diffusers takes it; (B, E) for the prior), else the
    draw :func:`jaxdiff.pipelines.cascade.run_stage` makes from the stage's key (so that every call passes an array
    and shares one compiled program)."""
    if value is None:
        return _stage_noise(key, stage, shape)
    a = np.asarray(value, np.float32)
    if a.ndim == 4 and a.shape != shape and (a.shape[0], a.shape[2], a.shape[3], a.shape[1]) == shape:
        a = a.transpose(0, 2, 3, 1)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}; expected {shape} (batch = prompts x images per prompt)")
    return jnp.asarray(a)


@partial(jax.jit, static_argnames=("shape",))
def _stage_noise(key: Array, stage: int, shape: tuple[int, ...]) -> Array:
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, stage), cascade.START_STREAM), shape)


@dataclasses.dataclass
class UnCLIP:
    """A loaded unCLIP folder (text-to-image with a prior, image variations with an image encoder, or both)."""

    models: UnCLIPModels
    text_encoder: Any  # PureModel of CLIPTextModelWithProjection
    tokenizer: Any
    schedulers: dict  # stage name -> scheduler config dict
    image_encoder: Any = None  # PureModel of CLIPVisionModelWithProjection
    processing: Any = None  # jaxdiff.semantic_guidance.ImageProcessing of the feature extractor
    name: str = "unclip"
    capacity: int = DEFAULT_CAPACITY

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Any = jnp.float32, capacity: int = DEFAULT_CAPACITY
                        ) -> "UnCLIP":
        """Load a diffusers ``UnCLIPPipeline`` or ``UnCLIPImageVariationPipeline`` folder (safetensors only)."""
        from jaxdiff.convert import load_component, read_component_config, read_model_index, require_components
        from jaxdiff.models.tokenizers import load_tokenizer
        from jaxdiff.semantic_guidance import image_processing

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"unCLIP folder {path} does not exist (a diffusers UnCLIPPipeline or "
                                    "UnCLIPImageVariationPipeline folder)")
        present = read_model_index(path).present()
        required = TEXT_TO_IMAGE if "prior" in present else VARIATION
        require_components(path, required)
        load = lambda name: PureModel.of(load_component(path, name, dtype=dtype))  # noqa: E731
        prior_module = load_component(path, "prior", dtype=dtype) if "prior" in present else None
        decoder = load_component(path, "decoder", dtype=dtype)
        sr_first = load_component(path, "super_res_first", dtype=dtype)
        scheds = {name: read_component_config(path, f"{name}_scheduler")
                  for name in ("prior", "decoder", "super_res") if f"{name}_scheduler" in present}
        train = {k: _sched.training_schedule(_sched.unclip_as_ddpm(v)) for k, v in scheds.items()}
        dsize, ssize = decoder.config.sample_size, sr_first.config.sample_size
        dsize = dsize if isinstance(dsize, int) else dsize[0]
        ssize = ssize if isinstance(ssize, int) else ssize[0]
        models = UnCLIPModels(
            prior=None if prior_module is None else PureModel.of(prior_module), text_proj=load("text_proj"),
            decoder=PureModel.of(decoder), super_res_first=PureModel.of(sr_first),
            super_res_last=load("super_res_last"),
            prior_ac=None if "prior" not in train else jnp.asarray(train["prior"].alphas_cumprod),
            decoder_ac=jnp.asarray(train["decoder"].alphas_cumprod),
            super_res_ac=jnp.asarray(train["super_res"].alphas_cumprod),
            embedding_dim=int(read_component_config(path, "text_proj")["clip_embeddings_dim"]),
            decoder_shape=(dsize, dsize, int(decoder.config.in_channels)),
            super_res_shape=(ssize, ssize, int(sr_first.config.in_channels) // 2),
            prior_prediction=train["prior"].prediction if "prior" in train else "sample",
            decoder_prediction=train["decoder"].prediction, super_res_prediction=train["super_res"].prediction,
            decoder_learned_variance=_sched.ddpm_variance(_sched.unclip_as_ddpm(scheds["decoder"])) == "learned_range",
            super_res_learned_variance=_sched.ddpm_variance(_sched.unclip_as_ddpm(scheds["super_res"])) == "learned_range")
        image_encoder = processing = None
        if "image_encoder" in present:
            enc = load_component(path, "image_encoder", dtype=dtype)
            image_encoder = PureModel.of(enc)
            pre = read_component_config(path, "feature_extractor") if "feature_extractor" in present else None
            processing = image_processing(pre, image_size=int(enc.config.image_size))
        return cls(models, load("text_encoder"), load_tokenizer(path / "tokenizer"), scheds, image_encoder,
                   processing, path.name, capacity)

    # -- pieces --

    def encode_prompts(self, prompts: Sequence[str]) -> dict:
        """The CLIP text embedding, last hidden states and mask of each prompt (padded to the tokenizer's length)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np")
        ids = jnp.asarray(tok["input_ids"], jnp.int32)
        out = _encode_text(self.text_encoder, ids)
        return dict(text_embeds=out[0], text_states=out[1], text_mask=np.asarray(tok["attention_mask"], bool))

    def encode_images(self, images: Any) -> Array:
        """CLIP image embeddings (B, E) of RGB images (B, H, W, 3) in [0, 1] (the feature extractor's resize,
        crop and normalisation), or of already normalised ``pixel_values`` when ``images`` is a dict holding them."""
        if self.image_encoder is None:
            raise ValueError("this unCLIP folder has no image_encoder (a text-to-image folder); load an "
                             "UnCLIPImageVariationPipeline folder for variations, or pass image embeddings")
        if isinstance(images, Mapping):
            pixels = jnp.asarray(images["pixel_values"], jnp.float32)
        else:
            pixels = self.processing(jnp.asarray(images, jnp.float32))
        return _encode_image(self.image_encoder, pixels)

    def plan(self, stage: str, steps: int) -> StageRun:
        """The stage's sampler and noise levels for ``steps`` steps (its scheduler config, reproduced)."""
        if stage not in self.schedulers:
            raise ValueError(f"this folder has no {stage}_scheduler")
        _, p = scheduler_plan(self.schedulers[stage], steps, self.capacity)
        return StageRun(p.sampler, p.sigmas)

    def _run(self, text: dict, uncond: dict, batch: int, *, image_embeds: Any, prior_steps: int, decoder_steps: int,
             super_res_steps: int, prior_guidance_scale: float, decoder_guidance_scale: float, seed: int,
             prior_latents: Any, decoder_latents: Any, super_res_latents: Any) -> tuple[Array, Array, Array]:
        m, key = self.models, jax.random.key(seed)
        prior = None
        if m.prior is not None:
            prior = dataclasses.replace(self.plan("prior", max(prior_steps, 2)), start=_start(
                prior_latents, (batch, m.embedding_dim), key, PRIOR, "prior_latents"))
        dec = dataclasses.replace(self.plan("decoder", decoder_steps), start=_start(
            decoder_latents, (batch,) + m.decoder_shape, key, DECODER, "decoder_latents"))
        sr = dataclasses.replace(self.plan("super_res", super_res_steps), start=_start(
            super_res_latents, (batch,) + m.super_res_shape, key, SUPER_RES, "super_res_latents"))
        given = image_embeds is not None
        if not given and m.prior is None:
            raise ValueError("this unCLIP folder has no prior (an image-variation folder): pass images or image "
                             "embeddings (variations)")
        embeds = np.asarray(image_embeds, np.float32) if given else np.zeros((batch, m.embedding_dim), np.float32)
        inp = UnCLIPInputs(text, uncond, np.float32(prior_guidance_scale), np.float32(decoder_guidance_scale),
                           prior, dec, sr, embeds, np.asarray(given))
        inp = jax.device_put(inp)  # host and device leaves alike: one compiled program for every call
        return sample_jit(m, inp, key, batch)

    # -- the three uses --

    def __call__(self, prompt: str | Sequence[str], *, num_images_per_prompt: int = 1, prior_steps: int = 25,
                 decoder_steps: int = 25, super_res_steps: int = 7, prior_guidance_scale: float = 4.0,
                 decoder_guidance_scale: float = 8.0, seed: int = 0, prior_latents: Any = None,
                 decoder_latents: Any = None, super_res_latents: Any = None, text: dict | None = None,
                 return_stages: bool = False) -> Any:
        """Text to image (diffusers' ``UnCLIPPipeline.__call__`` defaults): images (B, H, W, 3) in [0, 1].

        ``text`` (a dict of ``text_embeds``, ``text_states``, ``text_mask``) replaces the prompts' CLIP outputs
        (diffusers' ``text_model_output``); ``*_latents`` are the stages' start noises (``N(0, I)``; NHWC or NCHW);
        ``return_stages`` also returns the image embeddings and the decoder's images. Guidance always runs with
        the given scales (1: the conditional prediction); diffusers skips it altogether when both scales are <= 1,
        which differs only for a scale below 1."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if text is None:
            text = self.encode_prompts(prompts)
        else:
            text = {k: np.asarray(v) for k, v in text.items()}
        n = int(text["text_embeds"].shape[0])
        text = {k: np.repeat(np.asarray(v), num_images_per_prompt, axis=0) for k, v in text.items()}
        uncond = self.encode_prompts([""] * (n * num_images_per_prompt))
        out = self._run(text, uncond, n * num_images_per_prompt, image_embeds=None, prior_steps=prior_steps,
                        decoder_steps=decoder_steps, super_res_steps=super_res_steps,
                        prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale,
                        seed=seed, prior_latents=prior_latents, decoder_latents=decoder_latents,
                        super_res_latents=super_res_latents)
        return _finish(out, return_stages)

    def variations(self, image: Any = None, *, image_embeds: Any = None, num_images_per_prompt: int = 1,
                   decoder_steps: int = 25, super_res_steps: int = 7, decoder_guidance_scale: float = 8.0,
                   seed: int = 0, decoder_latents: Any = None, super_res_latents: Any = None,
                   return_stages: bool = False) -> Any:
        """Image variations (diffusers' ``UnCLIPImageVariationPipeline``): decode the CLIP image embedding of each
        input image (RGB (B, H, W, 3) in [0, 1], or ``{"pixel_values": ...}``) or the given ``image_embeds``
        with the empty prompt."""
        if (image is None) == (image_embeds is None):
            raise ValueError("give exactly one of image (RGB images in [0, 1]) and image_embeds")
        embeds = self.encode_images(image) if image_embeds is None else image_embeds
        embeds = np.repeat(np.asarray(embeds, np.float32), num_images_per_prompt, axis=0)
        b = int(embeds.shape[0])
        empty = self.encode_prompts([""] * b)
        out = self._run(empty, empty, b, image_embeds=embeds, prior_steps=2, decoder_steps=decoder_steps,
                        super_res_steps=super_res_steps, prior_guidance_scale=1.0,
                        decoder_guidance_scale=decoder_guidance_scale, seed=seed, prior_latents=None,
                        decoder_latents=decoder_latents, super_res_latents=super_res_latents)
        return _finish(out, return_stages)

    def interpolate(self, a: Any, b: Any, steps: int = 5, **kwargs: Any) -> Any:
        """Images along the spherical path between two image embeddings (E,) (or two images, encoded first):
        ``steps`` points from ``a`` to ``b``, each decoded as :meth:`variations` does (one batch)."""
        ea, eb = (self.encode_images(np.asarray(v)[None])[0] if np.ndim(v) == 3 else jnp.asarray(v, jnp.float32)
                  for v in (a, b))
        return self.variations(image_embeds=_slerp(ea, eb, np.linspace(0.0, 1.0, steps)), **kwargs)

    def interpolate_prompts(self, a: str, b: str, steps: int = 5, **kwargs: Any) -> Any:
        """Text-to-image along the spherical path between two prompts' CLIP outputs: the text embeddings and each
        token's hidden state slerped, the masks' union (as diffusers' community unCLIP text interpolation does);
        ``steps`` images, one batch, keyword arguments as :meth:`__call__`."""
        ta, tb = (self.encode_prompts([p]) for p in (a, b))
        w = np.linspace(0.0, 1.0, steps)
        text = dict(text_embeds=_slerp(ta["text_embeds"][0], tb["text_embeds"][0], w),
                    text_states=_slerp(ta["text_states"][0], tb["text_states"][0], w),
                    text_mask=np.broadcast_to(ta["text_mask"][0] | tb["text_mask"][0], (steps,) +
                                              ta["text_mask"].shape[1:]))
        return self([a] * steps, text=text, **kwargs)


@jax.jit
def _encode_text(model: PureModel, ids: Array) -> tuple[Array, Array]:
    out = model(ids)
    return out.text_embeds, out.last_hidden_state


@jax.jit
def _encode_image(model: PureModel, pixels: Array) -> Array:
    return model(pixels).image_embeds


def _finish(out: tuple[Array, Array, Array], stages_too: bool) -> Any:
    embeds, small, big = out
    images = np.clip(np.asarray(big) * 0.5 + 0.5, 0.0, 1.0)
    return (images, np.asarray(embeds), np.asarray(small)) if stages_too else images


def load(path: str | Path, **kwargs: Any) -> UnCLIP:
    """:meth:`UnCLIP.from_pretrained`."""
    return UnCLIP.from_pretrained(path, **kwargs)
