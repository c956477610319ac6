"""Training objectives of Palette (Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models"): a conditional
diffusion model that reads the source image concatenated with the noisy target, and the paper's regression baseline.

Palette's loss (eq. 1): ``E || f(x_src, sqrt(g) y + sqrt(1 - g) eps, g) - eps ||_p^p`` with p = 2 (L2, the default)
or p = 1 (L1; the paper finds L2 gives more diverse samples, L1 more conservative ones). Here ``f`` is the
network in diffusers' layout reading ``concat([noisy target, source], channels)`` (:class:`jaxdiff.conditioning.Concat`,
so the scaled noisy sample comes first, as diffusers' inpainting U-Nets), run through the same
:class:`~jaxdiff.denoisers.DiscreteVPDenoiser` the sampler uses, and ``eps_hat - eps = (x0 - x0_hat) / sigma``
in jaxdiff's sigma space. The regression baseline is the same network given zeros in place of the noisy
target, at a fixed timestep, trained to output the target with an L2 loss (no diffusion).

Batches carry ``"x"`` (targets, NHWC in [-1, 1]) and ``"source"`` (degraded images of the same shape,
:func:`jaxdiff.data.degradations.task_pairs`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, replace, static_field
from jaxdiff._util import batch_sigma, expand_to
from jaxdiff.conditioning import Concat
from jaxdiff.train.objectives import _check_template

Array = jax.Array
NORMS = ("l2", "l1")


def _norm(err: Array, norm: str) -> Array:
    axes = tuple(range(1, err.ndim))
    return jnp.mean(err * err if norm == "l2" else jnp.abs(err), axis=axes)


@pytree_dataclass
class PaletteObjective:
    """Palette's denoising loss on the epsilon error, L2 or L1 (``norm``), noise levels from ``levels``
    (e.g. :class:`jaxdiff.losses.DiscreteVPLevels`: t uniform on the training steps).

    ``denoiser``: an adapter with ``net=None`` (``DiscreteVPDenoiser(None, alphas_cumprod, "epsilon")``); the
    network inside it sees ``concat([x_t, source])``.
    """

    levels: Callable[[Array, int], Array]
    denoiser: Any
    norm: str = static_field(default="l2")

    needs_labels = False
    batch_keys = ("x", "source")

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")

    def denoiser_for(self, net: Callable[..., Array], source: Array | None = None) -> Any:
        """The sampler's denoiser for sources ``source`` (B, H, W, C); without one, around the bare network (which
        then needs a :func:`jaxdiff.conditioning.concat` transform)."""
        return replace(self.denoiser, net=net if source is None else Concat(net, source))

    def at(self, net: Callable[..., Array], x0: Array, source: Array, sigma: Array, noise: Array) -> Array:
        """Per-sample loss at given noise levels (B,) and noise."""
        x0 = x0.astype(jnp.float32)
        sigma = batch_sigma(sigma, x0)
        x = x0 + expand_to(sigma, x0) * noise
        x0_hat = self.denoiser_for(net, source)(x, sigma).astype(jnp.float32)
        return _norm((x0 - x0_hat) / expand_to(sigma, x0), self.norm)  # eps_hat - eps

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        k_sigma, k_noise = jax.random.split(key)
        x0 = batch["x"]
        sigma = self.levels(k_sigma, x0.shape[0]).astype(jnp.float32)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        return self.at(net, x0, batch["source"], sigma, noise), {}


@pytree_dataclass
class Regressor:
    """The regression baseline as a callable ``source -> target``: ``net(concat([0, source]), t, None)``."""

    net: Callable[..., Array]
    timestep: float = static_field(default=0.0)

    def __call__(self, source: Array) -> Array:
        t = jnp.full((source.shape[0],), self.timestep, jnp.float32)
        return Concat(self.net, source)(jnp.zeros_like(source), t, None)


@pytree_dataclass
class RegressionObjective:
    """The paper's baseline: the same network trained as an L2 regressor of the target on the source
    (:class:`Regressor`), no noise and no sampling."""

    timestep: float = static_field(default=0.0)

    needs_labels = False
    batch_keys = ("x", "source")

    def denoiser_for(self, net: Callable[..., Array]) -> Regressor:
        """The trained regressor (named so :meth:`jaxdiff.train.Trainer.denoiser` returns it)."""
        return Regressor(net, self.timestep)

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        del key
        pred = self.denoiser_for(net)(batch["source"]).astype(jnp.float32)
        return _norm(pred - batch["x"].astype(jnp.float32), "l2"), {}
