"""Inpainting as a denoiser transform and a start, for any model; masks at latent resolution.

:class:`MaskBlend` keeps the known region's clean latents as the x0 estimate there:
``D'(x) = m D(x) + (1 - m) x0_known``. Every first-order or multistep update of the core is a
combination ``x' = a x + b D`` with ``a + b = 1`` on the x0 part, so a run started from
``x0_known + sigma_0 noise`` in the known region stays at ``x0_known + sigma_i noise`` there: the same
latents diffusers' ``StableDiffusionInpaintPipeline`` re-noises and pastes after every step (for a
4-channel U-Net), without touching the sampler. The 9-channel inpainting U-Net instead reads
``[mask, masked-image latents]`` concatenated to its input, a network transform
(:func:`jaxdiff.conditioning.concat`, see :func:`jaxdiff.pipelines.stable_diffusion.network_transforms`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass

Array = jax.Array


@pytree_dataclass
class MaskBlend:
    """``D'(x, sigma) = mask * D(x, sigma) + (1 - mask) * known``; mask 1 = repaint, 0 = keep (latent size)."""

    inner: Callable[..., Array]
    mask: Array
    known: Array

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        m = self.mask.astype(x.dtype)
        return m * self.inner(x, sigma, cond) + (1.0 - m) * self.known.astype(x.dtype)


def mask_blend(mask: Any, known: Any) -> Callable[[Any], MaskBlend]:
    """The transform ``denoiser -> MaskBlend(denoiser, mask, known)`` (compose with :func:`jaxdiff.guidance.chain`)."""
    return jax.tree_util.Partial(MaskBlend, mask=jnp.asarray(mask), known=jnp.asarray(known))


def binarize(mask: Array) -> Array:
    """diffusers' mask processor: values >= 0.5 become 1 (repaint), others 0."""
    return (mask >= 0.5).astype(jnp.float32)


def mask_to_latent(mask: Array, factor: int) -> Array:
    """Nearest-neighbour downsampling by ``factor`` (``torch.nn.functional.interpolate``'s default mode)."""
    return mask[:, ::factor, ::factor, :]


def check_mask(mask: Any, height: int, width: int, batch: int) -> Array:
    """A mask as (B, H, W, 1) float in [0, 1]; (H, W), (H, W, 1), (B, H, W) and (B, H, W, 1) are accepted."""
    m = jnp.asarray(mask, jnp.float32)
    if m.ndim == 2:
        m = m[None, :, :, None]
    elif m.ndim == 3:  # (B, H, W) when its last two axes are the image's, else (H, W, 1) when single-channel
        m = m[..., None] if m.shape[1:] == (height, width) or m.shape[-1] != 1 else m[None]
    if m.ndim != 4 or m.shape[-1] != 1:
        raise ValueError(f"mask must be (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1), "
                         f"got shape {tuple(jnp.shape(mask))}")
    if m.shape[1:3] != (height, width):
        raise ValueError(f"mask is {m.shape[1]}x{m.shape[2]} but the image is {height}x{width} (HxW); "
                         "resize the mask to the image size")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {m.shape[0]} does not match the batch of {batch} images; "
                         "give one mask or one per image")
    return jnp.broadcast_to(m, (batch, height, width, 1))
