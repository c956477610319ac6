"""Small array helpers shared by the core (no Flax)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def batch_sigma(sigma: Array, x: Array) -> Array:
    """Noise level(s) as a vector of length ``x.shape[0]`` (a scalar is broadcast)."""
    sigma = jnp.asarray(sigma, dtype=x.dtype)
    if sigma.ndim > 1:
        raise ValueError(f"sigma must be a scalar or a vector of per-sample levels, got shape {sigma.shape}")
    return jnp.broadcast_to(sigma, (x.shape[0],))


def expand_to(v: Array, x: Array) -> Array:
    """Reshape a per-sample vector (B,) (or scalar) to broadcast against ``x`` (B, ...)."""
    v = jnp.asarray(v, dtype=x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def as_leaves(obj: Any, floats: tuple[str, ...] = (), ints: tuple[str, ...] = ()) -> None:
    """Store ``obj``'s numeric options as float32 (``floats``) or int32 (``ints``) arrays, in place.

    Python ints, floats, NumPy scalars and arrays of any dtype are then one abstract value under
    ``jit`` (a weakly typed ``0`` and ``0.0`` would compile two programs). ``None`` stays None. For
    use in a frozen dataclass's ``__post_init__``; a count given as a float must be integral.
    """
    for names, dtype in ((floats, jnp.float32), (ints, jnp.int32)):
        for name in names:
            value = getattr(obj, name)
            if value is None:
                continue
            try:
                arr = jnp.asarray(value)
            except TypeError:
                raise TypeError(f"{type(obj).__name__} option {name} must be a number or an array, got {value!r}") from None
            if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == jnp.bool_):
                raise TypeError(f"{type(obj).__name__} option {name} must be a number or an array, got {value!r}")
            if dtype == jnp.int32 and not jnp.issubdtype(arr.dtype, jnp.integer) and not isinstance(arr, jax.core.Tracer):
                if not np.all(np.mod(np.asarray(arr), 1) == 0):
                    raise ValueError(f"{type(obj).__name__} option {name} must be a whole number, got {value!r}")
            object.__setattr__(obj, name, arr.astype(dtype))
