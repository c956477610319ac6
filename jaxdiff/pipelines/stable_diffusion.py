"""Stable Diffusion 1.x / 2.x as a recipe: text encoder -> U-Net denoiser -> guidance -> sampler -> VAE.

Compatible with diffusers' ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` on the same folder, noise and scheduler. The whole generation
(text encoding, the sampling loop, VAE encode/decode) is one jit-compiled program whose inputs are
token ids, seeds, guidance scales, the schedule (with a traced step count) and the start step, so new
prompts, seeds, scales, strengths and step counts reuse it. Each image is sampled under ``jax.vmap``
from its own key, so an image depends on its seed only, never on its batch position or the device count.

The program is a composition of stages (:func:`encode`, :func:`start_latents`, :func:`network_transforms`,
:func:`guided_pair`, :func:`denoiser_transforms`, the sampler, :meth:`SDModels.decode`); which of them run
follows from the :class:`Request`'s structure (an init image, a mask, start latents present or ``None``),
never from a mode string. Two levels of user transforms run inside the compiled program:
``network_transform=`` wraps the U-Net network ``net(x_vp, t, cond)`` at every call inside guidance
(:mod:`jaxdiff.conditioning`), ``transform=`` wraps the guided denoiser (:mod:`jaxdiff.guidance`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditioning, guidance, sampling
from jaxdiff import parallel as _parallel
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.models._pure import PureModel
from jaxdiff.pipelines import inpaint as _inpaint
from jaxdiff.pipelines import schedulers as _sched

Array = jax.Array
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
UNET_KEYWORDS = (("residuals", "residuals"), ("attention", "control"), ("class_labels", "class_labels"))
"""(conditioning key, U-Net keyword): what :class:`UNetNet` hands the U-Net besides the context, when present."""


@pytree_dataclass
class UNetNet:
    """``net(x_vp, t, cond)`` for :class:`DiscreteVPDenoiser` around a ``UNet2DConditionModel``.

    ``cond`` is a dict: ``"context"`` (B, L, D) text, and when present (not None) ``"residuals"``
    (:class:`jaxdiff.conditioning.Residuals`), ``"attention"`` (an attention control) and ``"class_labels"``,
    passed as the U-Net's ``residuals=``, ``control=`` and ``class_labels=``; other keys (``"conditional"``)
    are for network transforms. Extra input channels (the 9-channel inpainting U-Net's mask and masked-image
    latents) come through :func:`jaxdiff.conditioning.concat`.
    """

    unet: Callable[..., Array]

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        extra = {kw: cond[key] for key, kw in UNET_KEYWORDS if cond.get(key) is not None}
        return self.unet(x, t, cond["context"], **extra)


@pytree_dataclass
class SDModels:
    """The networks of a Stable Diffusion folder as pure pytrees, with the settings that shape the program."""

    unet: PureModel
    vae: PureModel
    text_encoder: PureModel
    alphas_cumprod: Array
    prediction: str = static_field(default="epsilon")
    scaling_factor: float = static_field(default=0.18215)
    shift_factor: float | None = static_field(default=None)
    text_layer: int = static_field(default=-1)
    latent_channels: int = static_field(default=4)
    unet_in_channels: int = static_field(default=4)
    vae_factor: int = static_field(default=8)

    @property
    def reads_concat(self) -> bool:
        """True for the inpainting U-Net, which reads [mask, masked-image latents] after the latents."""
        return self.unet_in_channels > self.latent_channels

    def encode_text(self, ids: Array) -> Array:
        """Token ids (B, L) -> hidden states (B, L, D): the last layer (or ``clip_skip``'s) through the final norm."""
        return self.text_encoder.bind("hidden_state")(ids, self.text_layer, True)

    def denoiser(self, quantize: bool = False, network_transform: Any = None) -> DiscreteVPDenoiser:
        """The U-Net as ``D(x, sigma, {"context": ...}) -> x0`` (EDM coordinates, the scheduler's prediction type),
        its network wrapped in ``network_transform`` (a :mod:`jaxdiff.conditioning` transform or chain)."""
        net = conditioning.apply(UNetNet(self.unet), network_transform)
        return DiscreteVPDenoiser(net, self.alphas_cumprod, self.prediction, quantize)

    def guided(self, uncond: Any, scale: Array, rescale: Array = 0.0, quantize: bool = False,
               split: Any = None, network_transform: Any = None) -> guidance.ClassifierFree:
        """Classifier-free guidance in one batched U-Net call; rescale in the network's output space (diffusers).
        ``split`` (a ``NamedSharding``) splits that call's conditional / unconditional halves over devices."""
        space = "v" if self.prediction == "v_prediction" else "epsilon"
        den: Any = self.denoiser(quantize, network_transform)
        if split is not None:
            den = _parallel.ShardBatch(den, split)
        return guidance.ClassifierFree(den, scale, uncond, rescale, space)

    def encode_image(self, image: Array) -> tuple[Array, Array]:
        """Images (B, H, W, 3) in [-1, 1] -> the latent posterior's (mean, std), unscaled."""
        mean, logvar = self.vae.bind("encode")(image)
        return mean, jnp.exp(0.5 * logvar)

    def to_latent(self, z: Array) -> Array:
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def decode(self, latents: Array) -> Array:
        """Scaled latents -> images (B, H, W, 3) in [0, 1] (diffusers' ``image / 2 + 0.5``, clipped)."""
        z = latents / self.scaling_factor + (self.shift_factor or 0.0)
        img = self.vae.bind("decode")(z.astype(jnp.float32))
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


_batched = _parallel.batch_field


@pytree_dataclass
class Request:
    """The traced inputs of one generation (changing any of them reuses the compiled program).

    Which stages run follows from the structure: ``image`` None is text-to-image, ``image`` alone
    image-to-image, ``image`` and ``mask`` inpainting. Batched fields (axis 0) are declared with
    :func:`jaxdiff.parallel.batch_field`, so :func:`jaxdiff.parallel.shard_request` splits them.
    """

    ids: Array = _batched()          # (B, L) int32 prompt tokens
    neg_ids: Array = _batched()      # (B, L) int32 negative-prompt tokens
    seeds: Array = _batched()        # (B,) uint32
    scale: Array = _batched()        # (B,) float32 guidance scale
    rescale: Array                   # () float32 guidance rescale (phi)
    sigmas: Any                      # jaxdiff.schedules.Sigmas (traced values and count)
    init_sigma: Array                # () float32: standard deviation of the text-to-image start
    start: Array                     # () int32: first step (image-to-image strength)
    image: Array | None = _batched(default=None)  # (B, H, W, 3) in [-1, 1]
    mask: Array | None = _batched(default=None)   # (B, H, W, 1) in {0, 1}, 1 = repaint
    noise: Array | None = _batched(default=None)  # (B, h, w, c) float32: the user's start noise (diffusers' latents=)
    per_image: tuple | None = _batched(default=None)  # the network transform's PerImage values, (B, ...) each


NOISE_STREAM, SAMPLER_STREAM, POSTERIOR_STREAM, MASKED_POSTERIOR_STREAM = 0, 1, 2, 3


def noise_for_seed(seed: Array, shape: tuple[int, ...], stream: int = NOISE_STREAM) -> Array:
    """Standard-normal noise of one image: ``normal(fold_in(key(seed), stream), shape)``.

    Streams: 0 the start noise, 1 the sampler's key, 2 the VAE posterior sample of the init image,
    3 that of the masked image (inpainting U-Net).
    """
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), stream), shape, jnp.float32)


# ---- the stages -----------------------------------------------------------------------------------

def encode(m: SDModels, req: Request) -> dict:
    """Stage 1, batched: the per-image inputs: prompt embeddings, seeds, scales; the start noise, the init image's
    latent posterior and the latent mask when the request holds them (the masked image's for the inpainting U-Net)."""
    per = dict(seed=req.seeds, ctx=m.encode_text(req.ids), uctx=m.encode_text(req.neg_ids), scale=req.scale)
    if req.noise is not None:
        per["noise"] = req.noise.astype(jnp.float32)
    if req.per_image:
        per["per_image"] = req.per_image
    if req.image is not None:
        per["mean"], per["std"] = m.encode_image(req.image)
    if req.mask is not None:
        per["mask"] = _inpaint.mask_to_latent(req.mask, m.vae_factor)
        if m.reads_concat:
            per["masked_mean"], per["masked_std"] = m.encode_image(req.image * (req.mask < 0.5))
    return per


def start_latents(m: SDModels, req: Request, i: dict) -> tuple[Array, Array | None]:
    """Stage 2, one image: (start latents (1, h, w, c), the init image's latents or None).

    Noise times ``init_sigma``; with an init image its latents noised to the start level (image-to-image); with
    a mask as well, pure noise at strength 1 (start 0), and for a 4-channel U-Net the kept region noised."""
    noise = i["noise"][None] if "noise" in i else noise_for_seed(i["seed"], (1,) + i["latent_shape"])
    x = noise * req.init_sigma
    if "mean" not in i:
        return x, None
    z = i["mean"] + i["std"] * noise_for_seed(i["seed"], i["mean"].shape, POSTERIOR_STREAM)
    known = m.to_latent(z)[None]
    noisy = known + req.sigmas.values[req.start] * noise
    if "mask" not in i:
        return noisy, known
    x = jnp.where(req.start == 0, x, noisy)
    if not m.reads_concat:
        mask = i["mask"][None]
        x = mask * x + (1.0 - mask) * noisy
    return x, known


def network_transforms(m: SDModels, i: dict, user: Any = None) -> conditioning.Chain:
    """Stage 3, one image: the network transforms: the extra input channels of the inpainting U-Net ([mask,
    masked-image latents]) or of the depth U-Net (``i["depth"]``, :mod:`jaxdiff.pipelines.depth2img`), through
    :func:`jaxdiff.conditioning.concat` as diffusers concatenates them, then the user's."""
    if "depth" in i:
        return conditioning.chain(conditioning.concat(i["depth"][None]), user)
    if "masked_mean" not in i:
        return conditioning.chain(user)
    zm = i["masked_mean"] + i["masked_std"] * noise_for_seed(i["seed"], i["mean"].shape, MASKED_POSTERIOR_STREAM)
    extra = jnp.concatenate([i["mask"][None], m.to_latent(zm)[None]], axis=-1)
    return conditioning.chain(conditioning.concat(extra), user)


def guided_pair(i: dict) -> tuple[dict, dict]:
    """Stage 4, one image: the conditioning of the two halves of classifier-free guidance (``"conditional"`` 1 / 0)."""
    cond = {"context": i["ctx"][None], conditioning.CONDITIONAL: jnp.ones((1,), jnp.float32)}
    uncond = {"context": i["uctx"][None], conditioning.CONDITIONAL: jnp.zeros((1,), jnp.float32)}
    return cond, uncond


def denoiser_transforms(m: SDModels, i: dict, known: Array | None, user: Any = None) -> guidance.Chain:
    """Stage 5, one image: the denoiser transforms around the guided denoiser: the 4-channel U-Net's inpainting
    blend (:class:`jaxdiff.pipelines.inpaint.MaskBlend`), then the user's (the plan's threshold first)."""
    blend = None
    if "mask" in i and not m.reads_concat:
        blend = _inpaint.mask_blend(i["mask"][None], known)
    return guidance.chain(blend, user)


def _one_image(m: SDModels, sampler: Any, req: Request, i: dict, transform: Any, network_transform: Any,
               quantize: bool, progress: bool, split: Any = None) -> Array:
    """Sample one image (batch of 1 inside ``vmap``) -> final latents (h, w, c) in VP scale."""
    x, known = start_latents(m, req, i)
    if "per_image" in i:  # this image's control images (or other per-image values) with a batch axis of one
        network_transform = conditioning.fill_per_image(network_transform, tuple(v[None] for v in i["per_image"]))
    cond, uncond = guided_pair(i)
    den = m.guided(uncond, i["scale"], req.rescale, quantize, split, network_transforms(m, i, network_transform))
    den = denoiser_transforms(m, i, known, transform)(den)
    key = jax.random.fold_in(jax.random.key(i["seed"]), SAMPLER_STREAM)
    out, _ = sampling.sample_jit(den, sampler, req.sigmas, x, key, cond, progress, req.start)
    final = req.sigmas.values[req.sigmas.count]
    return out[0] * jax.lax.rsqrt(1.0 + final * final)


def with_per_image(network_transform: Any, req: Request) -> tuple[Any, Request]:
    """Move the network transform's :class:`jaxdiff.conditioning.PerImage` values into the request, so they are
    batched (and split over devices) with the prompts: image ``i`` of the call gets entry ``i`` of each."""
    network_transform, values = conditioning.take_per_image(network_transform)
    if not values:
        return network_transform, req
    n = int(req.seeds.shape[0])
    for v in values:
        if np.shape(v)[:1] != (n,):
            raise ValueError(f"a per-image value of the network transform has {np.shape(v)[0] if np.ndim(v) else 0} "
                             f"entries for {n} prompts: give one control image per prompt, or one shared by all")
    return network_transform, dataclasses.replace(req, per_image=(req.per_image or ()) + values)


def _cfg_split(mesh: Any) -> Any:
    """The sharding of one image's CFG pair over the mesh's ``cfg`` axis (None when it has none or size 1)."""
    if mesh is None or mesh.shape.get(_parallel.CFG, 1) == 1:
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_parallel.CFG))


def generate_latents(m: SDModels, sampler: Any, req: Request, transform: Any = None, network_transform: Any = None,
                     *, height: int, width: int, quantize: bool = False, progress: bool = False,
                     mesh: Any = None) -> Array:
    """The pure program without decoding: final latents (B, h, w, c) (diffusers' ``output_type="latent"``).

    ``transform`` (denoiser transforms) wraps the guided denoiser, ``network_transform`` (network transforms)
    the U-Net network at every call inside guidance; both are traced pytrees.
    ``mesh`` (static; :func:`jaxdiff.parallel.sampling_mesh`): with a ``cfg`` axis of size > 1 each image's
    U-Net call is split over it and the image axis along ``data`` (``vmap``'s ``spmd_axis_name``); the
    request is expected sharded along ``data`` (:func:`jaxdiff.parallel.shard_request`).
    """
    static = dict(latent_shape=(height // m.vae_factor, width // m.vae_factor, m.latent_channels))
    split = _cfg_split(mesh)
    network_transform, req = with_per_image(network_transform, req)

    def run(i: dict) -> Array:
        return _one_image(m, sampler, req, {**i, **static}, transform, network_transform, quantize, progress, split)

    return jax.vmap(run, spmd_axis_name=None if split is None else _parallel.DATA)(encode(m, req))


def generate(m: SDModels, sampler: Any, req: Request, transform: Any = None, network_transform: Any = None, *,
             height: int, width: int, quantize: bool = False, progress: bool = False, mesh: Any = None) -> Array:
    """The pure program: images (B, H, W, 3) in [0, 1]. Runs under ``jit``, ``pmap`` or a sharded ``jit``
    (``mesh``: see :func:`generate_latents`)."""
    lat = generate_latents(m, sampler, req, transform, network_transform, height=height, width=width,
                           quantize=quantize, progress=progress, mesh=mesh)
    return m.decode(lat)


_STATIC = ("height", "width", "quantize", "progress", "mesh")
generate_jit = jax.jit(generate, static_argnames=_STATIC)
generate_latents_jit = jax.jit(generate_latents, static_argnames=_STATIC)


# ---- host side: loading, tokenizing, checking ---------------------------------------------------

def _as_list(x: str | Sequence[str] | None, n: int | None, what: str) -> list[str] | None:
    if x is None:
        return None
    items = [x] if isinstance(x, str) else list(x)
    if not all(isinstance(p, str) for p in items):
        raise TypeError(f"{what} must be a string or a list of strings")
    if n is not None and len(items) == 1:
        items = items * n
    if n is not None and len(items) != n:
        raise ValueError(f"got {len(items)} {what}s for {n} prompts; give one, or one per prompt")
    return items


def _seeds(seed: int | Sequence[int] | None, n: int) -> np.ndarray:
    """One seed per image: a list of n seeds, or consecutive seeds from one integer (default 0)."""
    if seed is None:
        seed = 0
    if isinstance(seed, (int, np.integer)):
        return (np.arange(n, dtype=np.uint64) + int(seed)).astype(np.uint32)
    s = np.asarray(seed)
    if s.shape != (n,):
        raise ValueError(f"give one seed or {n} seeds (one per image), got {s.shape[0] if s.ndim else 'a'} {s.shape}")
    return s.astype(np.uint32)


def _check_size(height: int, width: int, factor: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v <= 0 or v % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling), got {v}; "
                             f"try {max(factor, int(round(v / factor)) * factor)}")


def _latents_array(latents: Any, n: int, shape: tuple[int, int, int], factor: int) -> np.ndarray:
    """User start latents -> (n, h, w, c) float32. Arrays are NHWC; a torch tensor is diffusers' NCHW; an array whose
    shape is only the NCHW one (not the NHWC one) is read as NCHW too."""
    h, w, c = shape
    nchw = (n, c, h, w)
    is_torch = type(latents).__module__.startswith("torch")
    arr = np.asarray(latents.detach().cpu().float().numpy() if is_torch else latents, np.float32)
    if is_torch or (arr.shape == nchw and arr.shape != (n, h, w, c)):
        if arr.shape != nchw:
            raise ValueError(f"latents (a torch tensor, NCHW) must have shape {nchw}, got {tuple(arr.shape)}")
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape != (n, h, w, c):
        raise ValueError(f"latents must have shape (batch, height/{factor}, width/{factor}, channels) = {(n, h, w, c)} "
                         f"(or NCHW {nchw}), got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("latents contain NaN or Inf")
    return arr


def _image_array(image: Any, batch: int) -> np.ndarray:
    """PIL image(s) or arrays (H, W, 3) / (B, H, W, 3) in [0, 1] -> (B, H, W, 3) float32 in [-1, 1]."""
    if isinstance(image, (list, tuple)):
        arr = np.stack([(_image_array(im, 1)[0] + 1.0) / 2.0 for im in image])  # each back in [0, 1]
    elif hasattr(image, "convert"):  # PIL
        arr = np.asarray(image.convert("RGB"), np.float32)[None] / 255.0
    else:
        arr = np.asarray(image, np.float32)
        arr = arr[None] if arr.ndim == 3 else arr
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"init image must be RGB (H, W, 3) or (B, H, W, 3) in [0, 1], got shape {arr.shape}")
    if arr.shape[0] == 1 and batch > 1:
        arr = np.repeat(arr, batch, axis=0)
    if arr.shape[0] != batch:
        raise ValueError(f"got {arr.shape[0]} init images for {batch} prompts; give one, or one per prompt")
    if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise ValueError(f"init image values must be in [0, 1], got [{arr.min():g}, {arr.max():g}]")
    return arr * 2.0 - 1.0


@dataclasses.dataclass
class StableDiffusion:
    """A loaded Stable Diffusion folder: tokenizer (host), networks (:class:`SDModels`), scheduler config."""

    models: SDModels
    tokenizer: Any
    train: _sched.TrainingSchedule
    name: str = "stable-diffusion"
    max_length: int = 77
    default_size: int = 512  # unet.config.sample_size * vae_factor (diffusers' default height and width)

    # -- loading --

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Any = jnp.float32, clip_skip: int | None = None,
                        variant: str | None = None, config: Any = None, prediction_type: str | None = None,
                        image_size: int | None = None) -> "StableDiffusion":
        """Load a diffusers Stable Diffusion (1.x, 2.x, inpainting) folder (safetensors weights only), or an
        original single ``.safetensors`` checkpoint (see :meth:`from_single_file`, which takes ``config``,
        ``prediction_type`` and ``image_size``).

        ``clip_skip`` k uses the hidden state k layers before the last, through the final norm (diffusers'
        ``clip_skip``). SD 2.x needs none: its folders already ship the truncated text encoder.
        """
        from jaxdiff.convert import load_component, read_component_config, require_components
        from jaxdiff.convert.safetensors_io import refuse_pickle
        from jaxdiff.models.tokenizers import load_tokenizer

        path = Path(path)
        if not path.is_dir():
            refuse_pickle(path)
        if path.is_file():
            return cls.from_single_file(path, config=config, prediction_type=prediction_type, image_size=image_size,
                                        dtype=dtype, clip_skip=clip_skip)
        if not path.exists():
            raise FileNotFoundError(f"model folder {path} does not exist")
        if config is not None or prediction_type is not None or image_size is not None:
            raise ValueError("config, prediction_type and image_size apply to single-file checkpoints; "
                             "a diffusers folder carries its own configs")
        require_components(path, REQUIRED, variant=variant)
        unet = load_component(path, "unet", dtype=dtype, variant=variant)
        vae = load_component(path, "vae", dtype=dtype, variant=variant)
        text = load_component(path, "text_encoder", dtype=dtype, variant=variant)
        tokenizer = load_tokenizer(path / "tokenizer")
        train = _sched.training_schedule(read_component_config(path, "scheduler"))
        return cls.from_modules(unet, vae, text, tokenizer, train, clip_skip=clip_skip, name=path.name)

    @classmethod
    def from_single_file(cls, path: str | Path, *, config: Any = None, prediction_type: str | None = None,
                         image_size: int | None = None, dtype: Any = jnp.float32,
                         clip_skip: int | None = None) -> "StableDiffusion":
        """Load an original (CompVis / Stability) SD 1.x or 2.x single ``.safetensors`` checkpoint.

        The U-Net, VAE and text encoder (CLIP for SD 1.x, OpenCLIP's penultimate layer for SD 2.x) are
        renamed from the original layout and their configs inferred from the tensor shapes
        (:mod:`jaxdiff.convert.ldm`), unless ``config`` gives them: a diffusers folder of the same model
        (its configs, scheduler and tokenizer are used), a JSON file or a dict with any of ``unet``,
        ``vae``, ``text_encoder``, ``scheduler``, ``prediction_type``, ``image_size``. The weights do not
        say what the network predicts: SD 1.x defaults to ``"epsilon"`` at 512 px, SD 2.x to the 768-v
        model (``"v_prediction"``, 768 px) as diffusers' ``from_single_file`` does; for SD 2.x 512-base
        pass ``prediction_type="epsilon", image_size=512``. Without a folder, the scheduler is SD's
        training schedule (DDIM, scaled_linear betas 0.00085-0.012, 1000 steps, steps_offset 1) and the
        tokenizer OpenAI CLIP's BPE (the vocabulary file jaxdiff ships). ``.ckpt`` files are refused.
        """
        from jaxdiff.convert.ldm import load_ldm_checkpoint, single_file_tokenizer

        nets = load_ldm_checkpoint(path, config, prediction_type=prediction_type, image_size=image_size, dtype=dtype)
        limit = int(nets.configs["text_encoder"].get("max_position_embeddings", 77))
        tokenizer = single_file_tokenizer(nets.text_kind, nets.config_folder, limit)
        train = _sched.training_schedule(nets.configs["scheduler"])
        return cls.from_modules(nets.unet, nets.vae, nets.text_encoder, tokenizer, train, clip_skip=clip_skip,
                                name=Path(path).stem)

    @classmethod
    def from_modules(cls, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, train: _sched.TrainingSchedule, *,
                     clip_skip: int | None = None, name: str = "stable-diffusion") -> "StableDiffusion":
        """Assemble from NNX modules (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``)."""
        if clip_skip is not None and clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
        vcfg = vae.config
        models = SDModels(
            PureModel.of(unet), PureModel.of(vae), PureModel.of(text_encoder), jnp.asarray(train.alphas_cumprod),
            train.prediction, float(vcfg.scaling_factor), vcfg.shift_factor,
            -1 - (clip_skip or 0), int(vcfg.latent_channels), int(unet.config.in_channels),
            2 ** (len(vcfg.block_out_channels) - 1))
        expected = (models.latent_channels, 2 * models.latent_channels + 1, models.latent_channels + 1)
        if models.unet_in_channels not in expected:
            raise ValueError(f"the U-Net reads {models.unet_in_channels} channels; Stable Diffusion pipelines take "
                             f"{expected[0]} (text-to-image), {expected[1]} (inpainting) or {expected[2]} "
                             "(depth-to-image: jaxdiff.pipelines.depth2img)")
        limit = int(getattr(text_encoder.config, "max_position_embeddings", 77))
        max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        ss = unet.config.sample_size or 64
        size = int(ss[0] if isinstance(ss, (list, tuple)) else ss) * models.vae_factor
        return cls(models, tokenizer, train, name, max_length, size)

    @property
    def is_inpainting_model(self) -> bool:
        return self.models.unet_in_channels == 2 * self.models.latent_channels + 1

    # -- pieces --

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids (B, max_length), padded and truncated as diffusers; warns about truncated text."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np")
        ids = np.asarray(tok["input_ids"], np.int32)
        for p, row in zip(prompts, self.tokenizer(list(prompts), truncation=False)["input_ids"]):
            if len(row) > self.max_length:
                dropped = self.tokenizer.decode(row[self.max_length - 1: -1])
                warnings.warn(f"prompt {p[:40]!r}... is longer than the text encoder's {self.max_length} tokens and "
                              f"was truncated; dropped: {dropped!r}", stacklevel=3)
        return ids

    def denoiser(self, quantize: bool = False, network_transform: Any = None) -> DiscreteVPDenoiser:
        """The U-Net as a denoiser (see :meth:`SDModels.denoiser`); conditioning ``{"context": encode_text(ids)}``."""
        return self.models.denoiser(quantize, network_transform)

    def encode_prompt(self, prompts: str | Sequence[str]) -> Array:
        """Text embeddings (B, L, D) as the U-Net reads them."""
        return self.models.encode_text(jnp.asarray(self.tokenize(_as_list(prompts, None, "prompt"))))

    def initial_noise(self, seeds: Sequence[int] | int, n: int, height: int, width: int,
                      stream: int = NOISE_STREAM) -> np.ndarray:
        """The standard-normal noise (n, h, w, c) of each seed: the start (multiply by the plan's ``init_sigma``),
        or with ``stream`` 2 / 3 the VAE posterior samples (see :func:`noise_for_seed`)."""
        f = self.models.vae_factor
        shape = (height // f, width // f, self.models.latent_channels)
        return np.stack([np.asarray(noise_for_seed(jnp.uint32(s), shape, stream)) for s in _seeds(seeds, n)])

    def plan(self, steps: int, sampler: str | None = None, schedule: str | None = None,
             **sampler_options: Any) -> _sched.Plan:
        """Sampler and schedule (default: the folder's scheduler, reproduced)."""
        return _sched.plan(self.train, steps, sampler, schedule, **sampler_options)

    # -- generation --

    def request(self, prompt: str | Sequence[str], *, negative: str | Sequence[str] | None = None,
                steps: int = 50, sampler: str | None = None, schedule: str | None = None, guidance: Any = 7.5,
                rescale: float = 0.0, seed: int | Sequence[int] | None = 0, height: int | None = None,
                width: int | None = None, image: Any = None, strength: float | None = None, mask: Any = None,
                latents: Any = None, sampler_options: Mapping[str, Any] | None = None,
                ) -> tuple[Request, _sched.Plan, dict]:
        """Check and tokenize the inputs; the :class:`Request`, the plan and the static settings.

        ``latents`` (diffusers' ``latents=``): the start noise, standard normal, (B, height/8, width/8, c) NHWC (a
        torch tensor, or an array of only the NCHW shape, is read as diffusers' (B, c, h, w)); the start is
        ``latents * plan.init_sigma``, as diffusers' ``prepare_latents`` multiplies by ``init_noise_sigma``. The
        seeds then no longer choose the start; they still key stochastic samplers' per-step noise. Text-to-image
        and inpainting at strength 1 only: diffusers' image-to-image takes no ``latents``, and its inpainting at
        strength < 1 starts from the given noise alone, ignoring the image, so both are refused.
        """
        prompts = _as_list(prompt, None, "prompt")
        if not prompts:
            raise ValueError("give at least one prompt")
        n = len(prompts)
        negatives = _as_list(negative if negative is not None else "", n, "negative prompt")
        plan = self.plan(steps, sampler, schedule, **dict(sampler_options or {}))
        if mask is not None and image is None:
            raise ValueError("a mask needs an init image (the picture to inpaint)")
        if image is None and mask is None and self.is_inpainting_model:
            raise ValueError("this is an inpainting U-Net (9 input channels): pass an init image and a mask")
        img = None if image is None else _image_array(image, n)
        if height is None:
            height = img.shape[1] if img is not None else self.default_size
        if width is None:
            width = img.shape[2] if img is not None else self.default_size
        _check_size(height, width, self.models.vae_factor)
        if img is not None and img.shape[1:3] != (height, width):
            raise ValueError(f"the init image is {img.shape[1]}x{img.shape[2]} but height x width is {height}x{width}; "
                             "resize the image or drop --height/--width")
        if strength is None:
            strength = 1.0 if mask is not None else 0.8
        start = 0 if image is None else _sched.img2img_start(steps, strength)
        noise = None
        if latents is not None:
            if start != 0 or (image is not None and mask is None):
                raise ValueError("latents= applies to text-to-image and to inpainting at strength 1 (as in diffusers); "
                                 "image-to-image starts from the noised init image: choose its noise with seed=")
            f = self.models.vae_factor
            noise = jnp.asarray(_latents_array(latents, n, (height // f, width // f, self.models.latent_channels), f))
        m = None if mask is None else _inpaint.binarize(_inpaint.check_mask(mask, height, width, n))
        scale = np.broadcast_to(np.asarray(guidance, np.float32), (n,)).copy()
        req = Request(jnp.asarray(self.tokenize(prompts)), jnp.asarray(self.tokenize(negatives)),
                      jnp.asarray(_seeds(seed, n)), jnp.asarray(scale), jnp.asarray(rescale, jnp.float32),
                      plan.sigmas, jnp.asarray(plan.init_sigma, jnp.float32), jnp.asarray(start, jnp.int32),
                      None if img is None else jnp.asarray(img), m, noise)
        static = dict(height=int(height), width=int(width), quantize=plan.quantize)
        return req, plan, static

    def placed_models(self, mesh: Any) -> SDModels:
        """The networks replicated on ``mesh``'s devices, kept for later calls on the same mesh."""
        cache = self.__dict__.setdefault("_placed", {})
        if mesh not in cache:
            cache.clear()  # one placement at a time: each holds a copy of the weights per device
            cache[mesh] = _parallel.shard_params(self.models, mesh)
        return cache[mesh]

    def run(self, req: Request, plan: _sched.Plan, static: Mapping[str, Any], transform: Any = None,
            network_transform: Any = None, *, progress: bool = False, latent: bool = False,
            mesh: Any = "auto") -> np.ndarray:
        """Run the compiled program on a checked :meth:`request`; images (or with ``latent`` latents) on the host.

        ``transform`` (denoiser transforms, after the plan's threshold) and ``network_transform`` (network
        transforms) run inside the compiled program; see :func:`generate_latents`.

        ``mesh="auto"`` splits the batch over the CPU devices (:func:`jaxdiff.parallel.sampling_mesh`: all
        cores by default, see :mod:`jaxdiff.cpu_devices`; no progress bar then), ``None`` runs on one device,
        or give a ``(data, cfg)`` mesh. The images equal the single-device ones within float rounding.
        """
        n = int(req.seeds.shape[0])
        if isinstance(mesh, str):
            if mesh != "auto":
                raise ValueError(f"mesh must be 'auto', None or a jax Mesh, got {mesh!r}")
            mesh = _parallel.sampling_mesh(n)
        fn = generate_latents_jit if latent else generate_jit
        transform = guidance.chain(plan.threshold, transform)
        network_transform, req = with_per_image(network_transform, req)
        if mesh is None:
            return np.asarray(fn(self.models, plan.sampler, req, transform, network_transform, progress=progress,
                                 **static))
        req, n = _parallel.shard_request(req, mesh)
        out = fn(self.placed_models(mesh), plan.sampler, req, transform, network_transform, progress=False, mesh=mesh,
                 **static)
        return _parallel.gather(out)[:n]

    def __call__(self, prompt: str | Sequence[str], *, transform: Any = None, network_transform: Any = None,
                 progress: bool = False, output: str = "np", mesh: Any = "auto", **kwargs: Any) -> Any:
        """Generate images: ``output="np"`` (B, H, W, 3) float32 in [0, 1], ``"pil"`` a list of PIL images,
        ``"latent"`` the final latents. Keyword arguments as :meth:`request`; ``transform`` (a pytree callable
        ``denoiser -> denoiser``, e.g. a :mod:`jaxdiff.guidance` transform) wraps the guided denoiser;
        ``network_transform`` (``net -> net``, e.g. a :mod:`jaxdiff.conditioning` transform) wraps the U-Net
        network ``net(x_vp, t, cond)`` at every call inside guidance; ``mesh`` as :meth:`run` (default: split
        over all CPU cores)."""
        if output not in ("np", "pil", "latent"):
            raise ValueError(f"output must be 'np', 'pil' or 'latent', got {output!r}")
        if self.models.unet_in_channels == self.models.latent_channels + 1:
            raise ValueError("this U-Net reads a depth channel (SD 2 depth): generate with "
                             "jaxdiff.pipelines.depth2img.load(folder)")
        req, plan, static = self.request(prompt, **kwargs)
        out = self.run(req, plan, static, transform, network_transform, progress=progress, latent=output == "latent",
                       mesh=mesh)
        if not np.all(np.isfinite(out)):
            raise FloatingPointError("generation produced NaN/Inf; try float32 (--dtype float32) "
                                     "or a lower guidance scale")
        if output == "pil":
            from jaxdiff.images import to_pil

            return [to_pil(im) for im in out]
        return out


def load(path: str | Path, **kwargs: Any) -> StableDiffusion:
    """``StableDiffusion.from_pretrained(path, **kwargs)``: a diffusers folder or an original single ``.safetensors``."""
    return StableDiffusion.from_pretrained(path, **kwargs)


def sigma_to_vp_scale(sigma: float) -> float:
    """``1 / sqrt(1 + sigma^2)``: VE -> VP coordinates (multiply jaxdiff latents by it for diffusers)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)
