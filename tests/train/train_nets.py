"""Tiny NNX networks and data shared by the training tests (and their subprocess scripts)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx


class TinyDenoiserNet(nnx.Module):
    """An MLP ``net(x, c_noise, cond) -> like x`` with an optional label embedding (index num_classes = null)."""

    def __init__(self, dim: int, hidden: int = 32, num_classes: int = 0, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.dim = dim
        self.l1 = nnx.Linear(dim + 1, hidden, rngs=rngs, dtype=dtype)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs, dtype=dtype)
        self.out = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype)
        self.embed = nnx.Embed(num_classes + 1, hidden, rngs=rngs) if num_classes else None

    def __call__(self, x, c, cond=None):
        h = jnp.concatenate([x.reshape(x.shape[0], -1), c[:, None].astype(x.dtype)], axis=-1)
        h = self.l1(h)
        if self.embed is not None and cond is not None:
            h = h + self.embed(cond).astype(h.dtype)
        h = self.l2(nnx.silu(h))
        return self.out(nnx.silu(h)).reshape(x.shape)


class TinyClassifierNet(nnx.Module):
    """An MLP ``net(x, c_noise) -> logits``."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 32, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(dim + 1, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x, c):
        h = jnp.concatenate([x.reshape(x.shape[0], -1), c[:, None].astype(x.dtype)], axis=-1)
        return self.l2(nnx.silu(self.l1(h)))


def gaussian_data(n: int = 512, dim: int = 4, seed: int = 0, num_classes: int = 0) -> dict:
    """x ~ N(mu_y, 0.25^2) with class means mu_y on a line; labels y uniform."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, max(num_classes, 1), n).astype(np.int32)
    x = (0.6 * (y[:, None] - 0.5) + 0.25 * rng.normal(size=(n, dim))).astype(np.float32)
    return {"x": x, "label": y} if num_classes else {"x": x}
