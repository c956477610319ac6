"""Low-precision kernels on XLA:CPU: convert each where its layer runs, not all at once.

XLA:CPU computes bfloat16 / float16 convolutions on float32 copies of their kernels. Such a convert
depends on the weight alone, so XLA's default (concurrency-optimised) scheduler may start all of them
early and keep the float32 copies alive together: the bfloat16 SD 1.5 U-Net at 1024x1024 planned 3.8 GiB
of temporaries, ~3 GiB of them weight copies. :func:`tie` makes a kernel depend on its layer's input by
adding ``0 * isnan(x[0, ..., 0])``, which is exactly zero for every input (finite or not) and fuses into
the convert, so each copy is made when its layer runs: 0.82 GiB (``benchmarks/attention.py``). Kernels
in float32, and every backend but the CPU, are left untouched (the traced program is unchanged there).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
LOW_PRECISION = (jnp.bfloat16, jnp.float16)
_enabled = [True]


def tie(kernel: Array, x: Array) -> Array:
    """``kernel``, made to depend on ``x`` when it is a low-precision kernel on the CPU (see the module doc)."""
    if not _enabled[0] or kernel.dtype not in LOW_PRECISION or jax.default_backend() != "cpu":
        return kernel
    first = x[(0,) * x.ndim]
    return kernel + jnp.isnan(first).astype(kernel.dtype) * 0


def conv_general_dilated(lhs: Array, rhs: Array, *args: Any, **kwargs: Any) -> Array:
    """``lax.conv_general_dilated`` with the kernel tied to the input (``nnx.Conv``'s ``conv_general_dilated``)."""
    return jax.lax.conv_general_dilated(lhs, tie(rhs, lhs), *args, **kwargs)


def dot_general(lhs: Array, rhs: Array, *args: Any, **kwargs: Any) -> Array:
    """``lax.dot_general`` with the kernel tied to the input (``nnx.Linear``'s ``dot_general``)."""
    return jax.lax.dot_general(lhs, tie(rhs, lhs), *args, **kwargs)


@contextmanager
def untied() -> Iterator[None]:
    """Trace without the ties inside the block (to measure what they save and cost)."""
    previous = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = previous
