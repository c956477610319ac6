"""A small image classifier (optionally noise-conditioned) for classifier guidance and for judging samples.

The built-in ``digits-classifier`` (noisy, guidance: Dhariwal & Nichol 2021) and ``digits-eval`` (clean,
accuracy and Frechet distance) are this network; :mod:`jaxdiff.builtin` loads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.layers import Maker, ResnetBlock2D, TimestepEmbedding, config_from_dict, timestep_embedding

Array = jax.Array


@dataclass(frozen=True)
class DigitClassifierConfig:
    """A small residual convnet; with ``time_conditioned`` its blocks see a timestep embedding (ADM's encoder)."""

    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    hidden: int = 64
    num_classes: int = 10
    norm_num_groups: int = 8
    time_conditioned: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DigitClassifierConfig":
        return config_from_dict(cls, dict(d))


class DigitClassifier(nnx.Module):
    """``net(x, t=None) -> logits``: residual blocks (each after the first halves H and W), pooling, MLP head."""

    def __init__(self, config: DigitClassifierConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        mk = Maker(rngs)
        c0, temb = c.block_out_channels[0], 4 * c.block_out_channels[0]
        self.conv_in = mk.conv(c.in_channels, c0, 3)
        self.time_embedding = TimestepEmbedding(c0, temb, mk) if c.time_conditioned else None
        chans = (c0, *c.block_out_channels)
        self.resnets = nnx.List([
            ResnetBlock2D(chans[i], chans[i + 1], mk, temb_channels=temb if c.time_conditioned else None,
                          groups=c.norm_num_groups, eps=1e-5, down=i > 0)
            for i in range(len(c.block_out_channels))])
        self.norm_out = mk.group_norm(chans[-1], c.norm_num_groups, 1e-5)
        self.proj = mk.linear(chans[-1], c.hidden)
        self.head = mk.linear(c.hidden, c.num_classes)

    def features(self, x: Array, t: Any = None) -> Array:
        """The penultimate activations (B, hidden)."""
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"x must be NHWC with {self.config.in_channels} channel(s), got shape {x.shape}")
        temb = None
        if self.time_embedding is not None:
            if t is None:
                raise ValueError("this classifier is noise-conditioned: pass the timesteps t")
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
            temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0], flip_sin_to_cos=True,
                                                          downscale_freq_shift=0.0))
        h = self.conv_in(x)
        for block in self.resnets:
            h = block(h, temb)
        h = jnp.mean(jax.nn.silu(self.norm_out(h)), axis=(1, 2))
        return jax.nn.silu(self.proj(h))

    def __call__(self, x: Array, t: Any = None) -> Array:
        return self.head(self.features(x, t))
