"""Class-conditional sampling with a Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): diffusers' ``DiTPipeline`` as one compiled jaxdiff program.

A DiT folder (``model_index.json``, ``transformer/`` a ``DiTTransformer2DModel``, ``scheduler/``, ``vae/`` an
``AutoencoderKL``; safetensors) becomes a :class:`DiTPipeline`. The transformer is an epsilon network on the
scheduler's discrete VP schedule, so it enters jaxdiff as a :class:`~jaxdiff.denoisers.DiscreteVPDenoiser`
around :class:`DiTNet`; classifier-free guidance (Ho & Salimans 2022) and the sampler wrap it; the VAE decodes.
Sampling, guidance and decoding run in one ``jax.jit`` whose step count, seed, labels and scale are traced.

**Learned sigma.** With ``out_channels == 2 * in_channels`` the transformer also predicts the variance
interpolation (the paper's Sec. 3, after Nichol & Dhariwal 2021); diffusers' pipeline discards it and steps
with the epsilon half only, and so does :class:`DiTNet`.

**Guidance, two ways** (``guided_channels``):

- ``None`` (default), as diffusers' ``DiTPipeline``: ``eps = eps_u + s (eps_c - eps_u)`` on *all* latent
  channels, when ``guidance > 1`` (at ``guidance <= 1`` the conditional model alone, one batch, as diffusers).
- ``3``, as the original code (facebookresearch/DiT, ``DiT.forward_with_cfg``, which guides ``model_out[:, :3]``
  "by default only applied to three channels"): the first three channels are guided and the others keep the
  conditional prediction. Any ``k`` guides the first ``k`` channels. Both are :class:`ChannelClassifierFree` with a
  traced channel mask, so switching between them reuses the compiled program.

Guidance combines x0 estimates; per element ``x0 = x - sigma eps`` is affine in eps with the same ``x``, so it
equals diffusers' combination of noise predictions channel by channel.

The null (unconditional) class is the transformer's ``num_embeds_ada_norm`` (1000 for the ImageNet models, which
is diffusers' hard-coded ``class_null``). A folder without ``vae`` (``"vae": [null, null]``) is a pixel-space model
(the built-in ``digits-dit``): the images are the samples mapped from [-1, 1] to [0, 1].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance as G
from jaxdiff import sampling, schedules
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._util import as_leaves, batch_sigma, expand_to
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.pipelines import schedulers as _sched

Array = jax.Array


# ---- network and guidance -------------------------------------------------------------------------

@pytree_dataclass
class DiTNet:
    """``net(x_vp, t, labels) -> eps`` for :class:`DiscreteVPDenoiser`: the transformer's first ``channels``
    output channels (a learned-sigma model's variance half is dropped, as diffusers' pipeline does)."""

    transformer: Callable[..., Array]
    channels: int = static_field()

    def __call__(self, x: Array, t: Array, cond: Any) -> Array:
        return self.transformer(x, t, cond)[..., : self.channels]


@pytree_dataclass
class ChannelClassifierFree:
    """Classifier-free guidance channel by channel: ``D = D_u + scale (D_c - D_u)`` where ``guided`` (C,) is 1 and
    ``D = D_c`` where it is 0. All ones is :class:`jaxdiff.guidance.ClassifierFree` (diffusers' ``DiTPipeline``);
    ones on the first three channels is facebookresearch/DiT's ``forward_with_cfg``.

    One batched call of ``inner`` on ``[x, x]`` with ``cond`` stacked on ``uncond``. ``scale`` and ``guided`` are
    traced leaves: changing either reuses the compiled program.
    """

    inner: Callable[..., Array]
    scale: Array
    uncond: Any
    guided: Array

    def __post_init__(self) -> None:
        as_leaves(self, floats=("scale", "guided"))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        both = self.inner(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), G.stack_cond(cond, self.uncond))
        c, u = jnp.split(both, 2, axis=0)
        guided = u + expand_to(jnp.asarray(self.scale, x.dtype), x) * (c - u)
        return jnp.where(jnp.asarray(self.guided) > 0.5, guided, c)


def guided_mask(channels: int, guided_channels: int | None = None) -> np.ndarray:
    """``(channels,)`` float32: 1 on the guided channels (all for None, as diffusers; the first k for k)."""
    k = channels if guided_channels is None else int(guided_channels)
    if not 1 <= k <= channels:
        raise ValueError(f"guided_channels must be between 1 and the {channels} latent channels "
                         f"(or None: all, as diffusers), got {guided_channels}")
    return (np.arange(channels) < k).astype(np.float32)


# ---- the compiled program -------------------------------------------------------------------------

@pytree_dataclass
class DiTModels:
    """The networks of a DiT folder as pure pytrees, with the settings that shape the program."""

    transformer: Any
    vae: Any  # a PureModel of AutoencoderKL, or None (pixel space)
    alphas_cumprod: Array
    prediction: str = static_field(default="epsilon")
    in_channels: int = static_field(default=4)
    null_label: int = static_field(default=1000)
    scaling_factor: float = static_field(default=0.18215)

    def denoiser(self, quantize: bool = False) -> DiscreteVPDenoiser:
        """``D(x, sigma, labels) -> x0`` (EDM coordinates), conditional on the class labels (B,)."""
        return DiscreteVPDenoiser(DiTNet(self.transformer, self.in_channels), self.alphas_cumprod, self.prediction,
                                  quantize)

    def guided(self, scale: Array, batch: int, guided: Array, quantize: bool = False) -> ChannelClassifierFree:
        """Classifier-free guidance against the null class on the channels ``guided`` (C,) marks: all of them
        (diffusers) or the first three (the original code); see :func:`guided_mask`."""
        null = jnp.full((batch,), self.null_label, jnp.int32)
        return ChannelClassifierFree(self.denoiser(quantize), scale, null, guided)

    def decode(self, latents: Array) -> Array:
        """Final latents (VP scale) -> images in [0, 1]: through the VAE, or directly in pixel space."""
        if self.vae is None:
            return jnp.clip(latents / 2 + 0.5, 0.0, 1.0)
        img = self.vae.bind("decode")(latents / self.scaling_factor)
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def generate(m: DiTModels, sampler: Any, sigmas: Any, init_sigma: Array, noise: Array, labels: Array, scale: Array,
             guided: Array, key: Array, threshold: Any = None, *, cfg: bool, quantize: bool = False,
             decode: bool = True) -> Array:
    """The pure program: ``noise * init_sigma`` down ``sigmas`` with the guided DiT, then decoded.

    ``cfg`` (static) switches classifier-free guidance on (diffusers: ``guidance_scale > 1``) at ``scale`` on the
    channels ``guided`` marks (:func:`guided_mask`; traced, like the scale); ``threshold`` is the
    scheduler config's x0 clipping as a denoiser transform (or None). Returns images (B, H, W, C) in [0, 1], or with
    ``decode=False`` the final latents in VP scale (diffusers' ``latents`` before the VAE).
    """
    den = m.guided(scale, labels.shape[0], guided, quantize) if cfg else m.denoiser(quantize)
    den = G.apply(den, threshold)
    out, _ = sampling.sample_jit(den, sampler, sigmas, noise * init_sigma, key, labels, False, 0)
    final = sigmas.values[sigmas.count]
    latents = out * jax.lax.rsqrt(1.0 + final * final)
    return m.decode(latents) if decode else latents


generate_jit = jax.jit(generate, static_argnames=("cfg", "quantize", "decode"))


# ---- host side ------------------------------------------------------------------------------------

def _labels(class_labels: Any, id2label: dict[str, str], num_classes: int) -> np.ndarray:
    items = [class_labels] if isinstance(class_labels, (int, str, np.integer)) else list(class_labels)
    if not items:
        raise ValueError("class_labels is empty: give at least one class (an int, or a name of the folder's id2label)")
    by_name = {str(v).strip(): int(k) for k, v in id2label.items()}
    for k, v in id2label.items():  # ImageNet names such as "tench, Tinca tinca": each comma-separated alias
        for alias in str(v).split(","):
            by_name.setdefault(alias.strip(), int(k))
    out = []
    for y in items:
        if isinstance(y, str):
            if y not in by_name:
                raise ValueError(f"unknown class name {y!r}; this model's names are in its model_index.json id2label")
            y = by_name[y]
        if isinstance(y, bool) or int(y) != y or not 0 <= int(y) <= num_classes:
            raise ValueError(f"class label {y!r} is outside [0, {num_classes}] ({num_classes} is the null class)")
        out.append(int(y))
    return np.asarray(out, np.int32)


def _noise_array(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
    """User start latents: NHWC, or diffusers' NCHW (a torch tensor or array), standard normal."""
    x = np.asarray(latents.detach().cpu().numpy() if hasattr(latents, "detach") else latents, np.float32)
    if x.shape != shape and x.ndim == 4 and x.transpose(0, 2, 3, 1).shape == shape:
        x = x.transpose(0, 2, 3, 1)
    if x.shape != shape:
        raise ValueError(f"latents must have shape {shape} (NHWC) or its NCHW transpose, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("latents contain NaN or Inf")
    return np.ascontiguousarray(x)


@dataclass(frozen=True)
class DiTPipeline:
    """A DiT folder ready to sample: ``pipe([207, 360], steps=25, guidance=4.0, seed=0)`` -> (B, H, W, 3) in [0, 1].

    ``models`` holds the pure networks; ``train`` the scheduler's training schedule (``alphas_cumprod``, prediction
    type, the class and config that choose the default sampler and timesteps: :func:`jaxdiff.pipelines.plan`).
    """

    models: DiTModels
    train: _sched.TrainingSchedule
    id2label: dict
    sample_size: int
    vae_factor: int = 1
    name: str = "dit"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Any = jnp.float32) -> "DiTPipeline":
        """A diffusers ``DiTPipeline`` folder (or one without a VAE: pixel space)."""
        from jaxdiff.convert.folders import load_component, read_component_config, require_components
        from jaxdiff.models._pure import PureModel

        path = Path(path)
        pf = require_components(path, ["transformer", "scheduler"])
        transformer = load_component(path, "transformer", dtype=dtype)
        tcfg = transformer.config
        vae, factor, scaling = None, 1, 0.18215
        if pf.components.get("vae", (None, None))[1] is not None:
            require_components(path, ["vae"])
            vae_module = load_component(path, "vae", dtype=dtype)
            vcfg = read_component_config(path, "vae")
            factor = 2 ** (len(vcfg.get("block_out_channels", (64,))) - 1)
            scaling = float(vcfg.get("scaling_factor", 0.18215))
            vae = PureModel.of(vae_module)
        train = _sched.training_schedule(read_component_config(path, "scheduler"))
        models = DiTModels(PureModel.of(transformer), vae, jnp.asarray(train.alphas_cumprod, jnp.float32),
                           train.prediction, tcfg.in_channels, int(tcfg.num_embeds_ada_norm), scaling)
        id2label = dict(pf.attributes.get("id2label") or {})
        return cls(models, train, id2label, int(tcfg.sample_size), factor, path.name)

    @classmethod
    def from_builtin(cls, name: str = "digits-dit") -> "DiTPipeline":
        """The built-in class-conditional DiT on 8x8 digits (:mod:`jaxdiff.builtin`)."""
        from jaxdiff import builtin

        return cls.from_pretrained(builtin.builtin_folder(name))

    @property
    def num_classes(self) -> int:
        return self.models.null_label

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.sample_size, self.sample_size, self.models.in_channels)

    def plan(self, steps: int, sampler: str | None = None, schedule: str | None = None,
             sigma_max: float | None = None) -> _sched.Plan:
        """The sampler and noise levels (default: the folder's scheduler with diffusers' timesteps).

        ``sigma_max`` caps the top of a ``karras`` / ``exponential`` schedule (which otherwise spans the whole
        training range: about 2e4 for the cosine schedule at t = 999, where few steps cannot recover); the start
        noise is then ``N(0, I)`` in VP coordinates at the cap."""
        p = _sched.plan(self.train, steps, sampler, schedule)
        if sigma_max is None:
            return p
        if p.schedule_name not in ("karras", "exponential"):
            raise ValueError(f"sigma_max applies to the karras and exponential schedules, not {p.schedule_name!r}")
        train = np.asarray(self.train.sigmas, np.float64)
        hi = float(min(train[-1], sigma_max))
        if not hi > train[0]:
            raise ValueError(f"sigma_max {sigma_max} is below the smallest training noise level {train[0]:.4g}")
        made = schedules.get_schedule(p.schedule_name)(steps, float(train[0]), hi)
        sigmas = schedules.Sigmas(jnp.asarray(made.values, jnp.float32), jnp.asarray(made.count, jnp.int32))
        return dataclasses.replace(p, sigmas=sigmas, init_sigma=float(np.sqrt(hi * hi + 1.0)))

    def initial_noise(self, seed: int, batch: int) -> np.ndarray:
        """Standard-normal start latents (B, h, w, c) of a seed: ``normal(fold_in(key(seed), 0))``."""
        return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), 0),
                                            (batch,) + self.latent_shape, jnp.float32))

    def __call__(self, class_labels: int | str | Sequence[int | str], *, steps: int = 50, guidance: float = 4.0,
                 seed: int = 0, latents: Any = None, sampler: str | None = None, schedule: str | None = None,
                 guided_channels: int | None = None, sigma_max: float | None = None,
                 output: str = "np") -> np.ndarray:
        """Images (B, H, W, C) float32 in [0, 1] for the labels (ints, or names of the folder's ``id2label``).

        Defaults are diffusers' (50 steps, guidance 4, the folder's scheduler). ``latents``: the standard-normal
        start (NHWC, or diffusers' NCHW as its ``randn_tensor`` draws it), else drawn from ``seed``, which also
        keys stochastic samplers. ``guided_channels``: see the module docstring; ``sigma_max``: see :meth:`plan`.
        ``output="latent"``: the final
        latents (VP scale) instead of images.
        """
        if output not in ("np", "latent"):
            raise ValueError(f"output must be 'np' or 'latent', got {output!r}")
        guidance = float(guidance)
        if not np.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        guided = guided_mask(self.models.in_channels, guided_channels)
        labels = _labels(class_labels, self.id2label, self.num_classes)
        shape = (len(labels),) + self.latent_shape
        noise = self.initial_noise(seed, len(labels)) if latents is None else _noise_array(latents, shape)
        p = self.plan(steps, sampler, schedule, sigma_max)
        key = jax.random.fold_in(jax.random.key(seed), 1)
        out = generate_jit(self.models, p.sampler, p.sigmas, jnp.float32(p.init_sigma), jnp.asarray(noise),
                           jnp.asarray(labels), jnp.float32(guidance), jnp.asarray(guided), key, p.threshold,
                           cfg=guidance > 1.0, quantize=p.quantize, decode=output == "np")
        return np.asarray(out, np.float32)


def load(path: str | Path, **kwargs: Any) -> DiTPipeline:
    """:meth:`DiTPipeline.from_pretrained`."""
    return DiTPipeline.from_pretrained(path, **kwargs)
