"""Cascades: sampling stages chained inside one compiled program (Imagen, unCLIP, GLIDE's upsampler).

Each :class:`Stage` samples at its own shape with its own network, parameterisation, transforms,
sampler and schedule. A stage after the first is conditioned on the previous stage's output, as the
super-resolution stages of cascaded diffusion do (Ho et al. 2022, "Cascaded Diffusion Models", §3.2
conditioning augmentation; Imagen, Saharia et al. 2022, §2.5): the output is resized to the stage's
size, noised at the stage's augmentation level ``z = up + augment * noise`` (EDM coordinates), and
handed to the network as extra input channels through :func:`jaxdiff.conditioning.concat`, with the
level in ``cond["noise_level"]`` (the SD x4 upscaler's and Imagen's level conditioning). DeepFloyd IF's stage II
noises in VP coordinates (diffusers' ``add_noise``: ``sqrt(abar_l) up + sqrt(1 - abar_l) noise``, i.e.
``(up + sigma_l noise) / sqrt(1 + sigma_l^2)``: ``augment_space="vp"``), hands the network the integer level
``l`` rather than ``sigma_l`` (``level``) and upsamples bilinearly with aligned corners
(``upsample="linear_align_corners"``, torch's ``F.interpolate(..., align_corners=True)``).

Step counts (the schedules' traced counts), guidance scales, augmentation levels, conditioning and
network parameters are all traced leaves of the stages, so :data:`cascade_jit` compiles once for a
given chain of stage classes and shapes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditioning, guidance, sampling
from jaxdiff._pytree import pytree_dataclass, static_field

Array = jax.Array
NOISE_LEVEL = "noise_level"
ALIGN_CORNERS = "linear_align_corners"
"""``Stage.upsample`` value for bilinear resizing with corners aligned (PyTorch's ``align_corners=True``, what
DeepFloyd IF's super-resolution pipeline upsamples with); other values are ``jax.image.resize`` methods."""
START_STREAM, AUGMENT_STREAM, SAMPLER_STREAM = 0, 1, 2


@pytree_dataclass
class Stage:
    """One sampling stage of a cascade.

    - ``network``: ``net(x, t, cond)`` (a pytree callable); ``denoiser`` maps it to a denoiser
      ``D(x, sigma, cond)`` (e.g. ``Transform(DiscreteVPDenoiser, {"alphas_cumprod": ...})``), or None when
      the network already is one in EDM coordinates (``t = sigma``);
    - ``network_transform`` / ``transform``: the user's network and denoiser transforms (guidance);
    - ``sampler``, ``sigmas`` (:class:`jaxdiff.schedules.Sigmas`, traced count), ``cond`` (the runner's);
    - ``shape``: one sample's shape, channels last; ``sigma_data``: start noise ``sqrt(sigma_max^2 + sigma_data^2)``;
    - ``upsample``: the ``jax.image.resize`` method that brings the previous output to ``shape``
      (None only for the first stage); ``augment``: its noise-augmentation level (traced);
      ``level_key``: the dictionary key the level reaches the network under (None: not passed);
    - ``level``: the value handed to the network under ``level_key`` (traced; None: ``augment``), e.g. the
      integer training step of the augmentation level; ``augment_space``: ``"ve"`` conditions on
      ``up + augment * noise``, ``"vp"`` on that divided by ``sqrt(1 + augment^2)`` (VP coordinates);
    - ``noise_scale``: the start noise's temperature (traced; GLIDE's upsampler samples from 0.997 x the noise);
      ``previous_transform``: applied to the previous output before it is upsampled (e.g. GLIDE's 8-bit rounding).
    """

    network: Any
    sampler: Any
    sigmas: Any
    shape: tuple = static_field()
    denoiser: Any = None
    transform: Any = None
    network_transform: Any = None
    cond: Any = None
    augment: Any = 0.0
    upsample: str | None = static_field(default=None)
    sigma_data: float = static_field(default=0.0)
    level_key: str | None = static_field(default=NOISE_LEVEL)
    level: Any = None
    augment_space: str = static_field(default="ve")
    noise_scale: Any = 1.0
    previous_transform: Callable[[Array], Array] | None = static_field(default=None)


@pytree_dataclass
class NoiseLevel:
    """Network transform: ``inner(x, t, {**cond, key: level})`` with ``level`` broadcast to the batch (B,)."""

    inner: Any
    level: Array
    key: str = static_field(default=NOISE_LEVEL)

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        if cond is not None and not isinstance(cond, Mapping):
            raise TypeError(f"a stage conditioned on a previous stage passes its level as cond[{self.key!r}], so its "
                            f"conditioning must be a dict or None, got {type(cond).__name__}; or set level_key=None")
        level = jnp.broadcast_to(jnp.asarray(self.level, x.dtype), (x.shape[0],))
        return self.inner(x, t, {**(cond or {}), self.key: level})


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights sampling ``n_in`` points at ``i (n_in - 1) / (n_out - 1)``."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize_align_corners(x: Array, size: Sequence[int]) -> Array:
    """Bilinear resize of (B, H, W, C) to ``size = (h, w)`` with aligned corners (torch's ``F.interpolate(...,
    mode="bilinear", align_corners=True)``): two small matrix products."""
    if len(size) != 2 or x.ndim != 4:
        raise ValueError(f"size {tuple(size)} must give one length per spatial axis of x {x.shape} (B, H, W, C)")
    mh = jnp.asarray(_align_corners_matrix(int(size[0]), x.shape[1]), x.dtype)
    mw = jnp.asarray(_align_corners_matrix(int(size[1]), x.shape[2]), x.dtype)
    return jnp.einsum("hi,bijc,wj->bhwc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def augmented(prev: Array, stage: Stage, key: Array) -> Array:
    """The previous output resized to the stage's shape (``stage.upsample``) plus ``augment`` times standard noise
    (divided by ``sqrt(1 + augment^2)`` when ``stage.augment_space == "vp"``)."""
    size = (prev.shape[0],) + tuple(stage.shape[:-1]) + (prev.shape[-1],)
    if stage.upsample == ALIGN_CORNERS:
        up = resize_align_corners(prev, stage.shape[:2])
    else:
        up = jax.image.resize(prev, size, stage.upsample)
    augment = jnp.asarray(stage.augment, up.dtype)
    out = up + augment * jax.random.normal(key, up.shape, up.dtype)
    if stage.augment_space == "vp":
        out = out * jax.lax.rsqrt(1.0 + augment * augment)
    elif stage.augment_space != "ve":
        raise ValueError(f"augment_space must be 've' or 'vp', got {stage.augment_space!r}")
    return out


def stage_denoiser(stage: Stage, extra: Array | None) -> Any:
    """The stage's denoiser: network transforms (``extra`` channels and their level first, then the user's),
    the parameterisation, then the denoiser transforms."""
    inner = None
    if extra is not None:
        value = stage.augment if stage.level is None else stage.level
        level = None if stage.level_key is None else conditioning.Transform(
            NoiseLevel, dict(level=jnp.asarray(value)), (("key", stage.level_key),))
        inner = conditioning.chain(conditioning.concat(extra), level)
    net = conditioning.apply(stage.network, inner, stage.network_transform)
    den = net if stage.denoiser is None else stage.denoiser(net)
    return guidance.apply(den, stage.transform)


def run_stage(stage: Stage, prev: Array | None, key: Array, batch: int) -> Array:
    """Sample one stage (conditioned on ``prev`` when given): keys ``fold_in(key, stream)`` for the start noise,
    the augmentation noise and the sampler."""
    if prev is not None and stage.upsample is None:
        raise ValueError("a stage after the first is conditioned on the previous output: give it upsample= "
                         "(a jax.image.resize method such as 'nearest' or 'linear')")
    if prev is not None and stage.previous_transform is not None:
        prev = stage.previous_transform(prev)
    extra = None if prev is None else augmented(prev, stage, jax.random.fold_in(key, AUGMENT_STREAM))
    x = sampling.initial_noise(jax.random.fold_in(key, START_STREAM), (batch,) + tuple(stage.shape),
                               stage.sigmas.values[0], stage.sigma_data)
    x = x * jnp.asarray(stage.noise_scale, x.dtype)
    den = stage_denoiser(stage, extra)
    out, _ = sampling.sample_jit(den, stage.sampler, stage.sigmas, x, jax.random.fold_in(key, SAMPLER_STREAM),
                                 stage.cond, False, 0)
    return out


def cascade(stages: Sequence[Stage], key: Array, batch: int) -> tuple[Array, ...]:
    """Run the stages in order, each conditioned on the previous output; every stage's output (stage ``i`` uses
    the key ``fold_in(key, i)``). Pure: under :data:`cascade_jit` the whole chain is one program."""
    if not stages:
        raise ValueError("a cascade needs at least one stage")
    outs: list[Array] = []
    for i, stage in enumerate(stages):
        outs.append(run_stage(stage, outs[-1] if outs else None, jax.random.fold_in(key, i), batch))
    return tuple(outs)


cascade_jit = jax.jit(cascade, static_argnames=("batch",))
"""``cascade_jit(stages, key, batch)``: one compiled program per chain of stage structures and shapes."""
