"""Exponential moving average of the weights (Polyak averaging; used by DDPM, EDM and most samplers)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay_at(decay: jax.Array, step: jax.Array, warmup: bool) -> jax.Array:
    """The decay used after ``step`` updates; with ``warmup``, ``min(decay, (1 + step) / (10 + step))``."""
    if not warmup:
        return decay
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf, in the EMA's dtype."""
    rate = 1.0 - jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda e, p: e + rate.astype(e.dtype) * (p.astype(e.dtype) - e), ema, params)
