"""Normalisation layers with PyTorch numerics on channels-last input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class GroupNorm(nnx.GroupNorm):
    """``torch.nn.GroupNorm`` on channels-last input (B, ..., C), same parameters as ``nnx.GroupNorm``.

    Statistics are two-pass (mean, then mean squared deviation) in float32, reduced first per
    channel over the contiguous spatial rows and then per group; normalisation and the affine map
    fold into one per-channel scale and shift. XLA:CPU runs this 4-10x faster than Flax's
    reduction over the (spatial, group-member) axes of a grouped reshape.
    """

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        if mask is not None or self.reduction_axes is not None or x.ndim < 3:
            return super().__call__(x, mask=mask)
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        xf = x.reshape(b, -1, c).astype(jnp.float32)
        n = xf.shape[1] * (c // g)
        per_group = lambda v: jnp.repeat(v.reshape(b, g, c // g).sum(-1) / n, c // g, axis=1)  # noqa: E731
        mean = per_group(xf.sum(axis=1))
        var = per_group(jnp.square(xf - mean[:, None, :]).sum(axis=1))
        scale = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            scale = scale * self.scale[...].astype(jnp.float32)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias[...].astype(jnp.float32)
        y = xf * scale[:, None, :] + shift[:, None, :]
        return y.reshape(x.shape).astype(self.dtype or x.dtype)
