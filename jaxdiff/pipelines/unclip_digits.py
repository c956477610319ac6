"""digits-unclip: unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents")
on the captioned colour digits, in digits-clip's embedding space.

Two stages, one compiled program: a diffusion **prior** (``PriorTransformer``) maps the caption's digits-clip text
embedding and text states to a unit image embedding ``z_i`` (x0 prediction, its own classifier-free guidance); a
**decoder** (digits-sd's latent U-Net, its time embedding plus a projection of ``z_i`` and its context = extra
tokens projected from ``z_i``, :class:`jaxdiff.models.unclip_image_proj.UnCLIPImageProj`) samples 8x8x4 latents that
digits-sd's VAE decodes to 32x32 RGB. Image variations encode an input image with digits-clip's image tower and run
the decoder alone; interpolations decode the spherical interpolation (:func:`slerp`) of two image embeddings.

Steps, guidance scales, prompts, seeds and embeddings are traced inputs: changing them compiles nothing new.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "digits"
NAME = "digits-unclip"
VAE_FROM = "digits-sd"
CLIP_FROM = "digits-clip"


def builtin_path(name: str) -> Path:
    """A shipped digits folder (``digits-sd``, ``digits-clip``, ``digits-unclip``)."""
    path = ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(f"the built-in {name!r} is missing ({path}); reinstall jaxdiff or retrain it "
                                "(examples/digits_sd/train.py, examples/unclip/train.py)")
    return path


def model_index() -> dict[str, Any]:
    """``model_index.json`` of digits-unclip: its own prior and decoder, digits-sd's VAE and digits-clip by name."""
    return {"_class_name": "UnCLIPDigits", "prior": ["jaxdiff", "PriorTransformer"],
            "decoder": ["jaxdiff", "UNet2DConditionModel + UnCLIPImageProjModel"],
            "vae": {"builtin": VAE_FROM, "component": "vae"}, "clip": {"builtin": CLIP_FROM},
            "embedding": "unit-norm digits-clip image_embeds (get_image_features / its norm)"}


# ------------------------------------------------------------------------------------------- encoders

def to_clip_pixels(images: Any) -> Array:
    """RGB in [0, 1] -> digits-clip's input range [-1, 1] (its image processor: mean = std = 0.5)."""
    return jnp.asarray(images, jnp.float32) * 2 - 1


def unit(x: Array, eps: float = 1e-12) -> Array:
    """``x / ||x||`` along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def load_vae(sd_folder: Path | None = None) -> Any:
    """digits-sd's ``AutoencoderKL`` (the decoder's latent space)."""
    from jaxdiff.convert import load_component

    return load_component(sd_folder or builtin_path(VAE_FROM), "vae")


def load_image_encoder() -> Any:
    """digits-clip's ``CLIPModel`` (image tower + projection are what the decoder reads)."""
    from jaxdiff.builtin import load_clip

    return load_clip(CLIP_FROM)[0]


def _chunked(fn: Any, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + chunk]))) for i in range(0, len(x), chunk)])


def encode_latents(vae: Any, images: np.ndarray) -> np.ndarray:
    """RGB [0, 1] -> the VAE posterior means times ``scaling_factor`` (what digits-sd and the decoder train on)."""
    from jaxdiff.models._pure import PureModel

    pure = PureModel.of(vae, "encode")
    return _chunked(lambda x: _encode_latents_jit(pure, to_clip_pixels(x)), np.asarray(images, np.float32)).astype(
        np.float32)


@jax.jit
def _encode_latents_jit(vae: Any, pixels: Array) -> Array:
    return vae(pixels)[0] * vae.module().config.scaling_factor


def image_embeddings(clip: Any, images: np.ndarray) -> np.ndarray:
    """RGB [0, 1] (N, 32, 32, 3) -> unit digits-clip image embeddings (N, projection_dim)."""
    from jaxdiff.models._pure import PureModel

    pure = PureModel.of(clip, "get_image_features")
    return _chunked(lambda x: _image_embeddings_jit(pure, x), np.asarray(images, np.float32)).astype(np.float32)


@jax.jit
def _image_embeddings_jit(clip: Any, images: Array) -> Array:
    return unit(clip(to_clip_pixels(images)))


def text_mask(ids: Array, eos_token_id: int) -> Array:
    """(B, L) booleans: True up to and including the first EOS (the tokens the prompt holds; the rest is padding)."""
    eos = jnp.asarray(ids) == eos_token_id
    before = jnp.cumsum(eos, axis=-1) - eos  # EOS tokens strictly before each position
    return before == 0


def encode_text(clip: Any, ids: Array) -> dict[str, Array]:
    """Token ids (B, L) -> the prior's conditioning: ``text_embeds`` (unit projected pooled text), ``text_states``
    (the final-norm hidden states, as digits-sd reads them) and ``text_mask``. ``clip`` is a digits-clip
    ``CLIPModel`` (or its :class:`~jaxdiff.models._pure.PureModel`); no padding mask, as digits-clip was trained."""
    m = clip.module() if hasattr(clip, "module") else clip
    out = m.text_model(ids)
    embeds = unit(m.text_projection(out.pooler_output))
    return {"text_embeds": embeds, "text_states": out.last_hidden_state,
            "text_mask": text_mask(ids, m.text_model.eos_token_id)}


def tokenize(tokenizer: Any, texts: list[str], length: int) -> np.ndarray:
    """(N, length) int32 ids: BOS, tokens, EOS, EOS padding (digits-clip's and Stable Diffusion's padding)."""
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__}")
    ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, np.int32)


# ------------------------------------------------------------------------------------------- the program

from jaxdiff import guidance  # noqa: E402
from jaxdiff._pytree import pytree_dataclass, static_field  # noqa: E402
from jaxdiff.denoisers import DiscreteVPDenoiser  # noqa: E402
from jaxdiff.pipelines import cascade as _cascade  # noqa: E402
from jaxdiff.pipelines import schedulers as _sched  # noqa: E402

PRIOR_STREAM, DECODER_STREAM = 0, 1


def slerp(a: Array, b: Array, t: Array) -> Array:
    """Spherical interpolation of unit vectors (Shoemake 1985; unCLIP sec. 3.2 interpolates CLIP image embeddings
    this way): ``sin((1-t) w) / sin w * a + sin(t w) / sin w * b`` with ``w`` the angle between ``a`` and ``b``.
    ``a``, ``b`` (..., d) are normalised first; ``t`` broadcasts against their leading axes. Unit norm is kept for
    every ``t``; ``t = 0`` gives ``a`` and ``t = 1`` gives ``b`` exactly; (nearly) parallel ends fall back to the
    normalised linear interpolation."""
    a, b = unit(jnp.asarray(a, jnp.float32)), unit(jnp.asarray(b, jnp.float32))
    t = jnp.asarray(t, jnp.float32)[..., None]
    cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True), -1.0, 1.0)
    w = jnp.arccos(cos)
    s = jnp.sin(w)
    small = s < 1e-6
    safe = jnp.where(small, 1.0, s)
    wa = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * w) / safe)
    wb = jnp.where(small, t, jnp.sin(t * w) / safe)
    out = wa * a + wb * b
    out = jnp.where(small, unit(out), out)
    return jnp.where(t == 0, a, jnp.where(t == 1, b, out))


@pytree_dataclass
class DecoderNet:
    """``net(x_vp, t, z)`` for the decoder: the image projection of ``z`` (B, d) into extra context tokens and a
    time-embedding addition, then the U-Net (``class_labels`` = the addition, ``class_embed_type="identity"``)."""

    unet: Any
    image_proj: Any

    def __call__(self, x: Array, t: Array, z: Array) -> Array:
        tokens, time_add = self.image_proj(z)
        return self.unet(x, t, tokens, class_labels=time_add)


@pytree_dataclass
class UnCLIPModels:
    """The networks of digits-unclip as pure pytrees (:class:`~jaxdiff.models._pure.PureModel`), with the two
    training schedules."""

    prior: Any
    unet: Any
    image_proj: Any
    vae: Any
    clip: Any
    prior_alphas_cumprod: Array
    decoder_alphas_cumprod: Array
    null_ids: Array  # (1, L) int32: the empty prompt's tokens
    scaling_factor: float = static_field(default=1.0)
    latent_shape: tuple = static_field(default=(8, 8, 4))
    prior_quantize: bool = static_field(default=False)
    decoder_quantize: bool = static_field(default=False)

    def null_text(self) -> dict[str, Array]:
        """The empty prompt's encoding (the prior's unconditional input; what its training dropped captions to)."""
        return encode_text(self.clip, self.null_ids)

    def prior_denoiser(self, scale: Array) -> Any:
        """The prior with classifier-free guidance on the empty prompt: ``D(x, sigma, text) -> z`` (standardised)."""
        from jaxdiff.models.prior import PriorNet

        den = DiscreteVPDenoiser(PriorNet(self.prior), self.prior_alphas_cumprod, "sample", self.prior_quantize)
        return guidance.ClassifierFree(den, scale, self.null_text(), 0.0, "x0")

    def decoder_denoiser(self, scale: Array) -> Any:
        """The decoder with classifier-free guidance on the learned null embedding: ``D(x, sigma, z) -> latents``."""
        proj = self.image_proj.module()
        den = DiscreteVPDenoiser(DecoderNet(self.unet, self.image_proj), self.decoder_alphas_cumprod, "epsilon",
                                 self.decoder_quantize)
        return guidance.ClassifierFree(den, scale, proj.null_embedding(1))

    def image_embeddings(self, images: Array) -> Array:
        """RGB [0, 1] (B, 32, 32, 3) -> unit digits-clip image embeddings."""
        return unit(self.clip.bind("get_image_features")(to_clip_pixels(images)))

    def prior_to_embedding(self, z: Array) -> Array:
        """The prior's standardised output -> a unit image embedding (``clip_std`` / ``clip_mean``, then normalised)."""
        return unit(self.prior.bind("post_process_latents")(z))

    def decode(self, latents: Array) -> Array:
        img = self.vae.bind("decode")(latents / self.scaling_factor)
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@pytree_dataclass
class UnCLIPRequest:
    """The traced inputs of one generation. What runs follows from the structure: ``embeddings`` given -> the
    decoder alone (interpolations); else ``image`` given -> its digits-clip embedding, then the decoder
    (variations); else ``ids`` -> the prior, then the decoder (text to image)."""

    seeds: Array                   # (B,) uint32
    prior_scale: Array             # (B,) float32
    decoder_scale: Array           # (B,) float32
    prior_sigmas: Any              # jaxdiff.schedules.Sigmas
    decoder_sigmas: Any
    ids: Array | None = None       # (B, L) int32
    image: Array | None = None     # (B, 32, 32, 3) in [0, 1]
    embeddings: Array | None = None  # (B, d) image embeddings (normalised inside)


def _stage(den: Any, sampler: Any, sigmas: Any, shape: tuple, cond: Any) -> _cascade.Stage:
    """A cascade stage whose network already is the guided denoiser; VP start ``x_T ~ N(0, I)`` (sigma_data 1)."""
    return _cascade.Stage(network=den, sampler=sampler, sigmas=sigmas, shape=shape, cond=cond, sigma_data=1.0)


def generate_one(m: UnCLIPModels, prior_sampler: Any, decoder_sampler: Any, req: UnCLIPRequest) -> tuple[Array, Array]:
    """One image (no batch axis in ``req``'s batched fields): ``(image (32, 32, 3), embedding (d,))``."""
    key = jax.random.key(req.seeds)
    if req.embeddings is not None:
        z = unit(jnp.asarray(req.embeddings, jnp.float32)[None])
    elif req.image is not None:
        z = m.image_embeddings(jnp.asarray(req.image, jnp.float32)[None])
    else:
        ids = req.ids[None]
        text = encode_text(m.clip, ids)
        d = m.prior.module().config
        prior = _stage(m.prior_denoiser(req.prior_scale), prior_sampler, req.prior_sigmas,
                       (int(d.clip_embed_dim or d.embedding_dim),), text)
        z = m.prior_to_embedding(_cascade.run_stage(prior, None, jax.random.fold_in(key, PRIOR_STREAM), 1))
    dec = _stage(m.decoder_denoiser(req.decoder_scale), decoder_sampler, req.decoder_sigmas, m.latent_shape, z)
    latents = _cascade.run_stage(dec, None, jax.random.fold_in(key, DECODER_STREAM), 1)
    return m.decode(latents)[0], z[0]


def generate(m: UnCLIPModels, prior_sampler: Any, decoder_sampler: Any, req: UnCLIPRequest) -> tuple[Array, Array]:
    """Every image of ``req`` from its own seed (``jax.vmap`` of :func:`generate_one`): images, embeddings."""
    axes = UnCLIPRequest(0, 0, 0, None, None, None if req.ids is None else 0, None if req.image is None else 0,
                         None if req.embeddings is None else 0)
    return jax.vmap(lambda r: generate_one(m, prior_sampler, decoder_sampler, r), in_axes=(axes,))(req)


generate_jit = jax.jit(generate)
"""One compiled program per request structure (text, image or embeddings) and batch size: steps, guidance
scales, prompts, seeds and images are traced."""
_embed_images_jit = jax.jit(lambda models, images: models.image_embeddings(images))


# ------------------------------------------------------------------------------------------- loading

def _load_image_proj(folder: Path) -> Any:
    from jaxdiff.convert import open_safetensors
    from jaxdiff.convert.torch_layout import build_from_tensors
    from jaxdiff.models.unclip_image_proj import UnCLIPImageProj, UnCLIPImageProjConfig

    config = json.loads((folder / "config.json").read_text())
    with open_safetensors(folder / "diffusion_pytorch_model.safetensors") as tensors:
        return build_from_tensors(UnCLIPImageProj, UnCLIPImageProjConfig, config, tensors)


def _load_prior(folder: Path) -> Any:
    from jaxdiff.convert import open_safetensors
    from jaxdiff.models.prior import PriorTransformer

    config = json.loads((folder / "config.json").read_text())
    with open_safetensors(folder / "diffusion_pytorch_model.safetensors") as tensors:
        return PriorTransformer.from_pretrained_tensors(config, tensors)


def _check_folder(folder: Path) -> None:
    need = ["model_index.json", "prior/config.json", "prior/scheduler_config.json", "decoder/unet/config.json",
            "decoder/text_proj/config.json", "decoder/scheduler_config.json"]
    missing = [n for n in need if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a digits-unclip folder: missing {', '.join(missing)}; retrain it with "
                                "examples/unclip/train.py")


class UnCLIPDigits:
    """digits-unclip: ``pipe(prompts)`` (text -> prior -> decoder), :meth:`variations`, :meth:`interpolate`.

    Every call runs :data:`generate_jit`; steps, guidance scales, prompts, seeds, images and embeddings are traced,
    so only a new request structure (text, image or embeddings) or batch size compiles.
    """

    def __init__(self, models: UnCLIPModels, tokenizer: Any, prior_train: Any, decoder_train: Any,
                 max_length: int) -> None:
        self.models, self.tokenizer, self.max_length = models, tokenizer, max_length
        self.prior_train, self.decoder_train = prior_train, decoder_train

    @classmethod
    def from_pretrained(cls, folder: str | Path | None = None) -> "UnCLIPDigits":
        """Load a digits-unclip folder (default: the built-in), with digits-sd's VAE and digits-clip as it names."""
        from jaxdiff.builtin import load_clip
        from jaxdiff.convert import load_model_folder
        from jaxdiff.models._pure import PureModel

        folder = Path(folder) if folder is not None else builtin_path(NAME)
        _check_folder(folder)
        index = json.loads((folder / "model_index.json").read_text())
        clip, tok = load_clip(index["clip"]["builtin"])
        vae = load_vae(builtin_path(index["vae"]["builtin"]))
        prior = _load_prior(folder / "prior")
        unet = load_model_folder(folder / "decoder" / "unet", class_name="UNet2DConditionModel")
        proj = _load_image_proj(folder / "decoder" / "text_proj")
        prior_train = _sched.training_schedule(_sched.read_scheduler_config(folder / "prior" / "scheduler_config.json"))
        dec_train = _sched.training_schedule(_sched.read_scheduler_config(folder / "decoder" / "scheduler_config.json"))
        length = int(clip.config.text_config.max_position_embeddings)
        models = UnCLIPModels(
            PureModel.of(prior), PureModel.of(unet), PureModel.of(proj), PureModel.of(vae), PureModel.of(clip),
            jnp.asarray(prior_train.alphas_cumprod, jnp.float32), jnp.asarray(dec_train.alphas_cumprod, jnp.float32),
            jnp.asarray(tokenize(tok, [""], length)), float(vae.config.scaling_factor),
            (unet.config.sample_size, unet.config.sample_size, unet.config.in_channels))
        return cls(models, tok, prior_train, dec_train, length)

    # ---- requests ---------------------------------------------------------------------------------
    def plans(self, prior_steps: int, decoder_steps: int) -> tuple[Any, Any]:
        """The two folders' samplers (DPM-Solver++ 2M) and schedules; the step counts are traced values."""
        return _sched.plan(self.prior_train, prior_steps), _sched.plan(self.decoder_train, decoder_steps)

    def _run(self, n: int, *, seed: int | list[int], prior_steps: int, decoder_steps: int, prior_guidance: float,
             decoder_guidance: float, **inputs: Any) -> tuple[np.ndarray, np.ndarray]:
        seeds = np.arange(seed, seed + n) if isinstance(seed, (int, np.integer)) else np.asarray(seed)
        if seeds.shape != (n,):
            raise ValueError(f"give one seed per image ({n}), got {seeds.shape[0] if seeds.ndim else 1}")
        pp, dp = self.plans(prior_steps, decoder_steps)
        m = dataclasses_replace(self.models, prior_quantize=pp.quantize, decoder_quantize=dp.quantize)
        req = UnCLIPRequest(jnp.asarray(seeds, jnp.uint32), jnp.full((n,), prior_guidance, jnp.float32),
                            jnp.full((n,), decoder_guidance, jnp.float32), pp.sigmas, dp.sigmas, **inputs)
        images, z = generate_jit(m, pp.sampler, dp.sampler, req)
        return np.asarray(images), np.asarray(z)

    def __call__(self, prompts: str | list[str], *, seed: int | list[int] = 0, prior_steps: int = 25,
                 decoder_steps: int = 20, prior_guidance: float = 4.0, decoder_guidance: float = 3.0,
                 return_embeddings: bool = False) -> Any:
        """Text to image: (N, 32, 32, 3) in [0, 1] (and the prior's unit embeddings with ``return_embeddings``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        ids = jnp.asarray(tokenize(self.tokenizer, prompts, self.max_length))
        images, z = self._run(len(prompts), seed=seed, prior_steps=prior_steps, decoder_steps=decoder_steps,
                              prior_guidance=prior_guidance, decoder_guidance=decoder_guidance, ids=ids)
        return (images, z) if return_embeddings else images

    def variations(self, images: Any, *, seed: int | list[int] = 0, decoder_steps: int = 20,
                   decoder_guidance: float = 3.0, return_embeddings: bool = False) -> Any:
        """Image variations (unCLIP sec. 3.1): decode each input image's digits-clip embedding from new noise."""
        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"images must be RGB (N, 32, 32, 3) in [0, 1], got shape {images.shape}")
        out, z = self._run(len(images), seed=seed, prior_steps=1, decoder_steps=decoder_steps, prior_guidance=1.0,
                           decoder_guidance=decoder_guidance, image=jnp.asarray(images))
        return (out, z) if return_embeddings else out

    def decode_embeddings(self, embeddings: Any, *, seed: int | list[int] = 0, decoder_steps: int = 20,
                          decoder_guidance: float = 3.0) -> np.ndarray:
        """Decode given image embeddings (N, d) (normalised first)."""
        z = np.asarray(embeddings, np.float32)
        if z.ndim != 2:
            raise ValueError(f"embeddings must be (N, d), got shape {z.shape}")
        return self._run(len(z), seed=seed, prior_steps=1, decoder_steps=decoder_steps, prior_guidance=1.0,
                         decoder_guidance=decoder_guidance, embeddings=jnp.asarray(z))[0]

    def embed_images(self, images: Any) -> np.ndarray:
        """Unit digits-clip image embeddings of RGB (N, 32, 32, 3) images in [0, 1]."""
        return np.asarray(_embed_images_jit(self.models, jnp.asarray(images, jnp.float32)))

    def interpolate(self, a: Any, b: Any, num: int = 5, *, seed: int = 0, decoder_steps: int = 20,
                    decoder_guidance: float = 3.0) -> np.ndarray:
        """Decode ``num`` embeddings along the great circle from image ``a`` to image ``b`` (unCLIP sec. 3.2), one
        noise seed for all frames (as the paper fixes the decoder noise)."""
        za, zb = self.embed_images(np.asarray([a, b], np.float32))
        t = jnp.linspace(0.0, 1.0, num)
        z = slerp(jnp.broadcast_to(za, (num, za.shape[0])), jnp.broadcast_to(zb, (num, zb.shape[0])), t)
        return self.decode_embeddings(z, seed=[seed] * num, decoder_steps=decoder_steps,
                                      decoder_guidance=decoder_guidance)


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    from jaxdiff._pytree import replace

    return replace(obj, **changes)


def load(folder: str | Path | None = None) -> UnCLIPDigits:
    """:meth:`UnCLIPDigits.from_pretrained` (default: the built-in digits-unclip)."""
    return UnCLIPDigits.from_pretrained(folder)
