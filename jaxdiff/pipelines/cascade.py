"""Cascades: sampling stages chained inside one compiled program (Imagen, unCLIP, GLIDE's upsampler).

Each :class:`Stage` samples at its own shape with its own network, parameterisation, transforms,
sampler and schedule. A stage after the first is conditioned on the previous stage's output, as the
super-resolution stages of cascaded diffusion do (Ho et al. 2022, "Cascaded Diffusion Models", §3.2
conditioning augmentation; Imagen, Saharia et al. 2022, §2.5): the output is resized to the stage's
size, noised at the stage's augmentation level ``z = up + augment * noise`` (EDM coordinates), and
handed to the network as extra input channels through :func:`jaxdiff.conditioning.concat`, with the
level in ``cond["noise_level"]`` (the SD x4 upscaler's and Imagen's level conditioning).

Step counts (the schedules' traced counts), guidance scales, augmentation levels, conditioning and
network parameters are all traced leaves of the stages, so :data:`cascade_jit` compiles once for a
given chain of stage classes and shapes.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxdiff import conditioning, guidance, sampling
from jaxdiff._pytree import pytree_dataclass, static_field

Array = jax.Array
NOISE_LEVEL = "noise_level"
ALIGN_CORNERS = "bilinear_align_corners"
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
    - ``upsample``: the ``jax.image.resize`` method (or :data:`ALIGN_CORNERS`) that brings the previous output
      to ``shape`` (None only for the first stage); ``augment``: its noise-augmentation level (traced);
      ``level_key``: the dictionary key the level reaches the network under (None: not passed).
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


def resize_align_corners(x: Array, size: Sequence[int]) -> Array:
    """Bilinear resize of the spatial axes of ``x`` (B, *spatial, C) to ``size`` with the corner pixels' centres
    aligned: output pixel ``i`` samples input coordinate ``i (n_in - 1) / (n_out - 1)`` (PyTorch's
    ``F.interpolate(..., mode="bilinear", align_corners=True)``)."""
    dims = tuple(range(1, x.ndim - 1))
    if len(size) != len(dims):
        raise ValueError(f"size {tuple(size)} must give one length per spatial axis of x {x.shape} (channels last)")
    # one output pixel samples the first input pixel; one input pixel fills the output (PyTorch's conventions)
    scale = [(n - 1) / (m - 1) if m > 1 and n > 1 else (float(n) if n > 1 else 1.0) for m, n in zip(x.shape[1:-1], size)]
    shift = [0.5 * (1.0 - s) if m > 1 and n > 1 else 0.0 for s, m, n in zip(scale, x.shape[1:-1], size)]
    out_shape = (x.shape[0],) + tuple(int(n) for n in size) + (x.shape[-1],)
    return jax.image.scale_and_translate(x, out_shape, dims, jnp.asarray(scale, x.dtype), jnp.asarray(shift, x.dtype),
                                         method="linear", antialias=False)


def augmented(prev: Array, stage: Stage, key: Array) -> Array:
    """The previous output resized to the stage's shape (``stage.upsample``) plus ``augment`` times standard noise."""
    size = (prev.shape[0],) + tuple(stage.shape[:-1]) + (prev.shape[-1],)
    up = (resize_align_corners(prev, size[1:-1]) if stage.upsample == ALIGN_CORNERS
          else jax.image.resize(prev, size, stage.upsample))
    return up + jnp.asarray(stage.augment, up.dtype) * jax.random.normal(key, up.shape, up.dtype)


def stage_denoiser(stage: Stage, extra: Array | None) -> Any:
    """The stage's denoiser: network transforms (``extra`` channels and their level first, then the user's),
    the parameterisation, then the denoiser transforms."""
    inner = None
    if extra is not None:
        level = None if stage.level_key is None else conditioning.Transform(
            NoiseLevel, dict(level=jnp.asarray(stage.augment)), (("key", stage.level_key),))
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
    extra = None if prev is None else augmented(prev, stage, jax.random.fold_in(key, AUGMENT_STREAM))
    x = sampling.initial_noise(jax.random.fold_in(key, START_STREAM), (batch,) + tuple(stage.shape),
                               stage.sigmas.values[0], stage.sigma_data)
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
