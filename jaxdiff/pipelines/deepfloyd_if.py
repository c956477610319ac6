"""Imagen-style pixel cascades: DeepFloyd IF's stage I (``IFPipeline``) and stage II (``IFSuperResolutionPipeline``).

Imagen (Saharia et al. 2022) samples a text-conditioned 64x64 base image and super-resolves it with U-Nets
conditioned on the low-resolution image noised to a chosen level (noise-conditioning augmentation, §2.5, the
level given to the network), with dynamic thresholding of the data estimate (§2.3) and, in DeepFloyd IF, learned
variances (``learned_range``, Nichol & Dhariwal 2021, eq. 15). This module loads diffusers' IF folders
(``model_index.json``, ``unet/``, ``scheduler/``, ``text_encoder/`` (a T5 encoder, or a CLIP text model),
``tokenizer/``, stage II's ``image_noising_scheduler/``) and runs any chain of them as stages of
:mod:`jaxdiff.pipelines.cascade` inside *one* compiled program: text encoding, every stage's sampling loop and the
augmentation. Step counts, guidance scales, augmentation levels, prompts and seeds are traced inputs.

In jaxdiff's coordinates (``x = x0 + sigma noise``): IF's start noise ``randn`` (VP) is ``sqrt(1 + sigma_0^2)
randn``; its augmentation ``add_noise(up, noise, l) = sqrt(abar_l) up + sqrt(1 - abar_l) noise`` is
``(up + sigma_l noise) / sqrt(1 + sigma_l^2)`` with ``sigma_l`` the image-noising schedule's level ``l``
(:class:`jaxdiff.pipelines.cascade.Stage` ``augment=sigma_l, augment_space="vp"``), and the network reads the
integer ``l`` as ``class_labels`` (``level=l``). Classifier-free guidance runs only when the scale exceeds 1,
as in diffusers (a traced ``where``, so a scale of 1 or less costs no recompile).

Noise streams (document for reproducing a run elsewhere): stage ``i`` of a cascade uses ``k = fold_in(key(seed),
i)``; its start noise is ``normal(fold_in(k, 0))`` (NHWC, VP coordinates), its augmentation noise
``normal(fold_in(k, 1))``, and sampler step ``j`` draws ``normal(fold_in(fold_in(k, 2), j))``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditioning, guidance
from jaxdiff import samplers as _samplers
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.models._pure import PureModel
from jaxdiff.pipelines import cascade as _cascade
from jaxdiff.pipelines import schedulers as _sched
from jaxdiff.pipelines.stable_diffusion import UNetNet

Array = jax.Array
PIPELINE_CLASSES = ("IFPipeline", "IFSuperResolutionPipeline")
TEXT_ENCODERS = {"T5EncoderModel": "t5", "CLIPTextModel": "clip"}
MAX_LENGTH = 77  # IF's encode_prompt pads and truncates every prompt to 77 tokens
DEFAULT_NOISE_LEVEL = 250
CASCADE_FILE = "cascade.json"


@pytree_dataclass
class FirstChannels:
    """Network transform: the first ``channels`` output channels (diffusers drops a learned variance the
    scheduler does not read: ``variance_type`` fixed)."""

    inner: Any
    channels: int = static_field()

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        return self.inner(x, t, cond)[..., : self.channels]


@pytree_dataclass
class IFModels:
    """One IF stage's networks and schedules as a pytree (static: what shapes the program)."""

    unet: PureModel
    text_encoder: PureModel | None
    alphas_cumprod: Array
    noising_sigmas: Array | None  # stage II: sigmas of image_noising_scheduler (T,)
    prediction: str = static_field(default="epsilon")
    text_kind: str | None = static_field(default="t5")
    channels: int = static_field(default=3)
    out_channels: int = static_field(default=3)
    variance: str = static_field(default="fixed_small")
    reads_level: bool = static_field(default=True)  # the U-Net has a class embedding (diffusers ignores labels else)

    @property
    def is_super_resolution(self) -> bool:
        return self.noising_sigmas is not None

    def encode_text(self, ids: Array, mask: Array) -> Array:
        """Token ids and attention mask (B, L) -> the text encoder's last hidden state (B, L, D), as IF reads it."""
        if self.text_encoder is None:
            raise ValueError("this IF folder has no text encoder: pass prompt embeddings (prompt_embeds=)")
        out = self.text_encoder(ids, mask)
        return out if self.text_kind == "t5" else out.last_hidden_state

    def network_transform(self) -> Any:
        """Drop the variance channels when the scheduler does not read them (fixed variances)."""
        if self.out_channels != self.channels and self.variance != "learned_range":
            return Transform(FirstChannels, {}, (("channels", self.channels),))
        return None

    def denoiser_transform(self) -> Transform:
        """The parameterisation: the U-Net (epsilon, v or sample) on IF's discrete schedule, integer timesteps."""
        static = (("prediction", self.prediction), ("quantize", True))
        if self.variance == "learned_range":
            static = static + (("learned_variance", True),)
        return Transform(DiscreteVPDenoiser, {"alphas_cumprod": self.alphas_cumprod}, static)


@pytree_dataclass
class StageRequest:
    """The traced inputs of one stage: the text (token ids + masks, or embeddings), the guidance scale, the
    schedule (traced count) and, for stage II, the augmentation level (an integer training step)."""

    sigmas: Any
    scale: Array
    level: Array
    ids: Array | None = None
    mask: Array | None = None
    neg_ids: Array | None = None
    neg_mask: Array | None = None
    context: Array | None = None
    uncontext: Array | None = None


def _texts(m: IFModels, r: StageRequest) -> tuple[Array, Array]:
    if r.context is not None:
        return r.context, r.uncontext
    both = m.encode_text(jnp.concatenate([r.ids, r.neg_ids]), jnp.concatenate([r.mask, r.neg_mask]))  # one call
    return both[: r.ids.shape[0]], both[r.ids.shape[0]:]


def build_stage(m: IFModels, sampler: Any, r: StageRequest, shape: tuple[int, int, int],
                texts: tuple[Array, Array] | None = None) -> _cascade.Stage:
    """The :class:`jaxdiff.pipelines.cascade.Stage` of an IF folder (traced inside the program)."""
    ctx, uctx = _texts(m, r) if texts is None else texts
    scale = jnp.where(r.scale > 1.0, r.scale, 1.0)  # diffusers guides only when guidance_scale > 1
    cfg = guidance.classifier_free(scale, {"context": uctx})
    common = dict(denoiser=m.denoiser_transform(), transform=cfg, network_transform=m.network_transform(),
                  cond={"context": ctx}, sigma_data=1.0)
    if not m.is_super_resolution:
        return _cascade.Stage(UNetNet(m.unet), sampler, r.sigmas, tuple(shape), **common)
    level = jnp.asarray(r.level, jnp.int32)
    augment = m.noising_sigmas[jnp.clip(level, 0, m.noising_sigmas.shape[0] - 1)]
    return _cascade.Stage(UNetNet(m.unet), sampler, r.sigmas, tuple(shape), augment=augment,
                          upsample=_cascade.ALIGN_CORNERS, level_key="class_labels" if m.reads_level else None,
                          level=level.astype(jnp.float32), augment_space="vp", **common)


def generate(models: tuple[IFModels, ...], samplers: tuple, requests: tuple[StageRequest, ...], key: Array,
             image: Array | None, *, batch: int, shapes: tuple) -> tuple[Array, ...]:
    """Every stage's output (VP = data coordinates, about [-1, 1]), the whole chain in one program.

    Without ``image`` the first stage is a base stage and the rest follow :func:`jaxdiff.pipelines.cascade.cascade`;
    with ``image`` (B, h, w, C) in [-1, 1] every stage is a super-resolution stage and the first is conditioned on
    it (stage ``i`` keyed ``fold_in(key, i)`` either way). A stage without a text encoder reads the previous
    stage's text embeddings (IF's stage II may share stage I's T5)."""
    stages, texts = [], None
    for m, s, r, shape in zip(models, samplers, requests, shapes):
        if r.context is not None or r.ids is not None:
            texts = _texts(m, r)
        elif texts is None:
            raise ValueError("the first stage needs a text encoder or prompt embeddings")
        stages.append(build_stage(m, s, r, shape, texts))
    if image is None:
        return _cascade.cascade(stages, key, batch)
    outs = [image]
    for i, st in enumerate(stages):
        outs.append(_cascade.run_stage(st, outs[-1], jax.random.fold_in(key, i), batch))
    return tuple(outs[1:])


generate_jit = jax.jit(generate, static_argnames=("batch", "shapes"))
"""``generate_jit(models, samplers, requests, key, image, batch=, shapes=)``: one program per chain structure."""


def to_images(x: Array | np.ndarray) -> np.ndarray:
    """IF's ``output_type="np"``: ``clip(x / 2 + 0.5, 0, 1)``, NHWC float32."""
    return np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0.0, 1.0)


# ---- folders ---------------------------------------------------------------------------------------------

def _read_index(path: Path) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} has no model_index.json; expected a diffusers IFPipeline or "
                                "IFSuperResolutionPipeline folder (save one with pipe.save_pretrained(folder))")
    return json.loads(index.read_text())


def _component(index: Mapping[str, Any], name: str) -> str | None:
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def variance_type(config: Mapping[str, Any]) -> str:
    """jaxdiff's DDPM variance for the scheduler config's ``variance_type`` (diffusers' default ``fixed_small``)."""
    return _sched.ddpm_variance(config)


@dataclasses.dataclass
class IFPipeline:
    """A loaded IF stage folder (``IFPipeline`` or ``IFSuperResolutionPipeline``): tokenizer (host), networks
    (:class:`IFModels`), the scheduler config."""

    models: IFModels
    tokenizer: Any
    train: _sched.TrainingSchedule
    sample_size: int
    name: str = "deepfloyd-if"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Any = jnp.float32) -> "IFPipeline":
        """Load a diffusers IF folder (safetensors weights). ``text_encoder`` and ``tokenizer`` may be null
        (then pass ``prompt_embeds``); stage II folders need ``image_noising_scheduler/``."""
        from jaxdiff.convert import load_component, read_component_config
        from jaxdiff.models.tokenizers import load_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"IF folder {path} does not exist (or is not a folder)")
        index = _read_index(path)
        kind = index.get("_class_name")
        is_sr = kind == "IFSuperResolutionPipeline" or _component(index, "image_noising_scheduler") is not None
        if kind not in PIPELINE_CLASSES and kind is not None:
            raise ValueError(f"{path} holds a {kind}, not one of {', '.join(PIPELINE_CLASSES)}")
        for need in ("unet", "scheduler") + (("image_noising_scheduler",) if is_sr else ()):
            if _component(index, need) is None or not (path / need).is_dir():
                raise FileNotFoundError(f"{path}: component {need}/ is missing (an IF folder needs unet/, scheduler/"
                                        f"{', image_noising_scheduler/' if is_sr else ''})")
        unet = load_component(path, "unet", dtype=dtype)
        text_cls = _component(index, "text_encoder")
        text, text_kind = None, None
        if text_cls is not None:
            if text_cls not in TEXT_ENCODERS:
                raise ValueError(f"{path}: text encoder {text_cls} is not supported; expected "
                                 f"{' or '.join(TEXT_ENCODERS)}")
            text, text_kind = load_component(path, "text_encoder", dtype=dtype), TEXT_ENCODERS[text_cls]
        tokenizer = load_tokenizer(path / "tokenizer") if _component(index, "tokenizer") is not None else None
        sched_cfg = read_component_config(path, "scheduler")
        train = _sched.training_schedule(sched_cfg)
        noising = None
        if is_sr:
            noising = _sched.training_schedule(read_component_config(path, "image_noising_scheduler")).sigmas
        ucfg = unet.config
        in_ch, out_ch = int(ucfg.in_channels), int(ucfg.out_channels)
        channels = in_ch // 2 if is_sr else in_ch
        variance = variance_type(sched_cfg)
        if variance == "learned_range" and out_ch != 2 * channels:
            raise ValueError(f"{path}: variance_type learned_range needs a U-Net with {2 * channels} output channels "
                             f"(mean and variance), this one has {out_ch}")
        models = IFModels(PureModel.of(unet), None if text is None else PureModel.of(text),
                          jnp.asarray(train.alphas_cumprod), None if noising is None else jnp.asarray(noising, jnp.float32),
                          train.prediction, text_kind, channels, out_ch, variance,
                          getattr(ucfg, "class_embed_type", None) is not None
                          or getattr(ucfg, "num_class_embeds", None) is not None)
        ss = ucfg.sample_size or 64
        size = int(ss[0] if isinstance(ss, (list, tuple)) else ss)
        return cls(models, tokenizer, train, size, path.name)

    @property
    def is_super_resolution(self) -> bool:
        return self.models.is_super_resolution

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention masks (B, 77) as IF's ``encode_prompt`` (lower-cased, stripped: its text
        preprocessing without caption cleaning)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer: pass prompt embeddings (prompt_embeds=)")
        limit = MAX_LENGTH
        if self.models.text_kind == "clip":
            cfg = self.models.text_encoder.module().config
            limit = min(limit, int(getattr(cfg, "max_position_embeddings", MAX_LENGTH)))
        tok = self.tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=limit,
                             truncation=True, add_special_tokens=True, return_tensors="np")
        return np.asarray(tok["input_ids"], np.int32), np.asarray(tok["attention_mask"], np.int32)

    def sampler(self, variance: str | None = None) -> Any:
        """diffusers' DDPMScheduler step for this folder: the config's variance type and its thresholding /
        clipping of x0 (:func:`jaxdiff.pipelines.schedulers.threshold_transform`)."""
        name = self.train.class_name or "DDPMScheduler"
        if name != "DDPMScheduler":
            raise ValueError(f"{self.name}: IF folders sample with DDPMScheduler, this one names {name}")
        threshold = _sched.threshold_transform("DDPMScheduler", self.train.config)
        return _samplers.DDPM(variance=variance or self.models.variance, threshold=threshold)

    def sigmas(self, steps: int) -> Any:
        """diffusers' DDPMScheduler timesteps for ``steps`` steps, as traced levels (capacity: the default)."""
        return _sched.plan(self.train, steps, "ddpm").sigmas

    def request(self, batch: int, *, prompt: str | Sequence[str] | None = None, negative: Any = None,
                prompt_embeds: Any = None, negative_prompt_embeds: Any = None, steps: int = 50,
                guidance: float = 7.0, noise_level: int = DEFAULT_NOISE_LEVEL) -> StageRequest:
        """This stage's :class:`StageRequest` (checked on the host)."""
        levels = len(self.train.alphas_cumprod) if self.models.noising_sigmas is None else len(
            self.models.noising_sigmas)
        if isinstance(noise_level, bool) or int(noise_level) != noise_level or not 0 <= int(noise_level) < levels:
            raise ValueError(f"noise_level must be an integer step in [0, {levels}) of the image-noising schedule, "
                             f"got {noise_level}")
        common = dict(sigmas=self.sigmas(steps), scale=jnp.asarray(guidance, jnp.float32),
                      level=jnp.asarray(int(noise_level), jnp.int32))
        if prompt_embeds is not None:
            ctx = jnp.asarray(np.asarray(prompt_embeds, np.float32))
            unc = jnp.zeros_like(ctx) if negative_prompt_embeds is None else jnp.asarray(
                np.asarray(negative_prompt_embeds, np.float32))
            if ctx.shape[0] != batch or unc.shape != ctx.shape:
                raise ValueError(f"prompt_embeds {tuple(ctx.shape)} and negative_prompt_embeds {tuple(unc.shape)} "
                                 f"must both be (batch={batch}, length, dim)")
            return StageRequest(**common, context=ctx, uncontext=unc)
        if prompt is None:
            return StageRequest(**common)  # reads the previous stage's embeddings (an error for a first stage)
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")
        negatives = [negative or ""] * batch if negative is None or isinstance(negative, str) else list(negative)
        if len(negatives) != batch:
            raise ValueError(f"got {len(negatives)} negative prompts for {batch} prompts; give one, or one per prompt")
        ids, mask = self.tokenize(prompts)
        nids, nmask = self.tokenize(negatives)
        return StageRequest(**common, ids=jnp.asarray(ids), mask=jnp.asarray(mask), neg_ids=jnp.asarray(nids),
                            neg_mask=jnp.asarray(nmask))

    def shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        return (int(height or self.sample_size), int(width or self.sample_size), self.models.channels)

    def __call__(self, prompt: str | Sequence[str] | None = None, *, image: Any = None, steps: int = 50,
                 guidance: float = 7.0, noise_level: int = DEFAULT_NOISE_LEVEL, seed: int = 0,
                 height: int | None = None, width: int | None = None, negative: Any = None,
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None, output: str = "np") -> np.ndarray:
        """One stage alone: text-to-image (stage I) or, with ``image`` (B, h, w, 3) in [-1, 1], super-resolution.
        ``output="np"``: images in [0, 1] (diffusers' ``output_type="np"``); ``"raw"``: the sample itself."""
        batch = self._batch(prompt, prompt_embeds)
        if self.is_super_resolution and image is None:
            raise ValueError("a super-resolution stage needs the low-resolution image (image=, values in [-1, 1])")
        if image is not None and not self.is_super_resolution:
            raise ValueError("this is a base (IFPipeline) folder: it takes no image")
        img = None if image is None else jnp.asarray(np.asarray(image, np.float32))
        if img is not None and (img.ndim != 4 or img.shape[0] != batch or img.shape[-1] != self.models.channels):
            raise ValueError(f"image must be (batch={batch}, height, width, {self.models.channels}) NHWC in [-1, 1], "
                             f"got shape {tuple(img.shape)}")
        req = self.request(batch, prompt=prompt, negative=negative, prompt_embeds=prompt_embeds,
                           negative_prompt_embeds=negative_prompt_embeds, steps=steps, guidance=guidance,
                           noise_level=noise_level)
        (out,) = generate_jit((self.models,), (self.sampler(),), (req,), jax.random.key(seed), img, batch=batch,
                              shapes=(self.shape(height, width),))
        return np.asarray(out) if output == "raw" else to_images(out)

    @staticmethod
    def _batch(prompt: Any, prompt_embeds: Any) -> int:
        if prompt_embeds is not None:
            return int(np.shape(prompt_embeds)[0])
        if prompt is None:
            raise ValueError("give a prompt or prompt_embeds")
        return 1 if isinstance(prompt, str) else len(prompt)


def _per_stage(value: Any, n: int, what: str) -> list:
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) != n:
        raise ValueError(f"{what}: give one value or one per stage ({n}), got {len(vals)}")
    return vals


@dataclasses.dataclass
class IFCascade:
    """IF stage I followed by super-resolution stages, all in one compiled program (:func:`generate`)."""

    stages: tuple[IFPipeline, ...]

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Any = jnp.float32) -> "IFCascade":
        """A cascade folder: ``stage_1/`` (an IFPipeline folder), ``stage_2/`` (IFSuperResolutionPipeline), ...
        or a ``cascade.json`` ``{"stages": ["folder", ...]}`` naming them (relative to the file)."""
        return cls.from_stages([IFPipeline.from_pretrained(f, dtype=dtype) for f in stage_folders(path)])

    @classmethod
    def from_stages(cls, stages: Sequence[IFPipeline]) -> "IFCascade":
        stages = tuple(stages)
        if stages[0].is_super_resolution:
            raise ValueError(f"the first stage ({stages[0].name}) must be a base IFPipeline folder")
        for s in stages[1:]:
            if not s.is_super_resolution:
                raise ValueError(f"stage {s.name} follows another stage, so it must be an IFSuperResolutionPipeline "
                                 "folder (with image_noising_scheduler/)")
        return cls(stages)

    def requests(self, prompt: Any, *, steps: Any = (50, 25), guidance: Any = (7.0, 4.0),
                 noise_level: Any = DEFAULT_NOISE_LEVEL, negative: Any = None, prompt_embeds: Any = None,
                 negative_prompt_embeds: Any = None) -> tuple[int, tuple[StageRequest, ...]]:
        n = len(self.stages)
        batch = IFPipeline._batch(prompt, prompt_embeds)
        steps_, scales = _per_stage(steps, n, "steps"), _per_stage(guidance, n, "guidance")
        levels = _per_stage(noise_level, n, "noise_level")
        reqs = []
        for i, st in enumerate(self.stages):
            own = i == 0 or (prompt_embeds is None and st.models.text_encoder is not None)
            reqs.append(st.request(batch, prompt=prompt if own else None, negative=negative,
                                   prompt_embeds=prompt_embeds if i == 0 else None,
                                   negative_prompt_embeds=negative_prompt_embeds if i == 0 else None,
                                   steps=steps_[i], guidance=scales[i], noise_level=levels[i]))
        return batch, tuple(reqs)

    def __call__(self, prompt: Any = None, *, steps: Any = (50, 25), guidance: Any = (7.0, 4.0),
                 noise_level: Any = DEFAULT_NOISE_LEVEL, seed: int = 0, negative: Any = None,
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 output: str = "np") -> tuple[np.ndarray, ...]:
        """Every stage's images (``output="np"``: [0, 1]; ``"raw"``: the samples). Per-stage ``steps`` and
        ``guidance`` (one value or one per stage) and ``noise_level`` (stage II's augmentation step) are runtime
        values: changing them reuses the compiled program."""
        batch, reqs = self.requests(prompt, steps=steps, guidance=guidance, noise_level=noise_level,
                                    negative=negative, prompt_embeds=prompt_embeds,
                                    negative_prompt_embeds=negative_prompt_embeds)
        outs = generate_jit(tuple(s.models for s in self.stages), tuple(s.sampler() for s in self.stages), reqs,
                            jax.random.key(seed), None, batch=batch, shapes=tuple(s.shape() for s in self.stages))
        return tuple(np.asarray(o) if output == "raw" else to_images(o) for o in outs)


def stage_folders(path: str | Path) -> list[Path]:
    """The stage folders of a cascade folder, in order: those a ``cascade.json`` names (``{"stages": [...]}``,
    relative to it), else ``stage_1/``, ``stage_2/``, ..."""
    path = Path(path)
    if (path / CASCADE_FILE).is_file():
        spec = json.loads((path / CASCADE_FILE).read_text())
        names = spec.get("stages") if isinstance(spec, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path / CASCADE_FILE} must hold {{\"stages\": [\"folder\", ...]}}")
        return [path / n for n in names]
    folders = sorted((p for p in path.glob("stage_*") if p.is_dir() and p.name[6:].isdigit()),
                     key=lambda p: int(p.name[6:]))
    if not folders:
        raise FileNotFoundError(f"{path} holds no stage_1/, stage_2/ ... folders (nor a {CASCADE_FILE})")
    return folders


def load(path: str | Path, **kwargs: Any) -> IFPipeline | IFCascade:
    """An IF stage folder (``model_index.json``) as :class:`IFPipeline`, or a cascade folder as :class:`IFCascade`."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return IFPipeline.from_pretrained(path, **kwargs)
    return IFCascade.from_pretrained(path, **kwargs)


def is_cascade_folder(path: str | Path) -> bool:
    """True for a folder holding ``stage_1/`` (an IF folder) or a ``cascade.json``."""
    path = Path(path)
    return (path / CASCADE_FILE).is_file() or (path / "stage_1" / "model_index.json").is_file()
