"""The one way jaxdiff's networks build layers: :class:`Maker` (keys, dtypes, Linear / Conv / norm /
Embed factories with PyTorch- or Flax-default initialisation), the initialisers behind it, the one
activation table (diffusers' and transformers' names), ``Identity``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.torch_layout import shapes_only
from jaxdiff.models.layers import weight_tie
from jaxdiff.models.layers.norms import GroupNorm

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    # transformers' ACT2FN names (CLIP, T5)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation called ``name`` in diffusers' ``get_activation`` / transformers' ``ACT2FN``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _host_or_traced(host: Callable[[np.random.Generator, tuple], np.ndarray],
                    traced: Callable[..., Array]) -> Callable[..., Array]:
    """An initializer drawing on the host (numpy) for concrete keys, in JAX for traced ones.

    Eager JAX random draws compile once per parameter shape (0.1-1 s each on CPU), which made
    building even a tiny U-Net take tens of seconds; under ``nnx.eval_shape`` or ``jit`` the key is
    traced and the JAX version keeps the build abstract / compiled. Inside
    :func:`jaxdiff.convert.torch_layout.abstract` the values are thrown away, so zeros are traced
    (one op instead of a random-number kernel per parameter: a smaller, faster trace).
    """

    def init(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
        if isinstance(key, jax.core.Tracer):
            return jnp.zeros(shape, dtype) if shapes_only() else traced(key, shape, dtype)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        return jnp.asarray(host(rng, tuple(shape)), dtype)

    return init


def torch_default_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default Linear/Conv2d initialisation: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    for weights and biases (kaiming-uniform with a = sqrt(5)), as a diffusers model starts from."""
    bound = 1.0 / math.sqrt(fan_in)
    return _host_or_traced(lambda rng, shape: rng.uniform(-bound, bound, shape),
                           lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))


class KeySource:
    """Per-layer initialisation keys ``fold_in(key, i)`` drawn with a Python counter.

    Passed to Flax layers in place of ``nnx.Rngs`` (they only call ``.params()``). ``nnx.Rngs``
    keeps its counter in a traced Variable, and under ``nnx.eval_shape`` every draw then costs a
    scan of the whole trace so far: building SD 1.5 abstractly took ~30 s instead of ~2 s.
    """

    def __init__(self, key: Array):
        self.key, self.count = key, 0

    def params(self) -> Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


_INITS = ("torch", "flax")


@dataclass(frozen=True)
class Maker:
    """Construction context: random keys and dtypes, with layer factories. The one way jaxdiff's
    networks build their layers.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. Norms compute their
    statistics in float32 whatever ``dtype`` is (Flax does so), and use the two-pass variance
    as PyTorch does. ``init="torch"`` starts Linear / Conv / Embed weights as PyTorch's defaults
    (what a diffusers model starts from); ``init="flax"`` uses Flax's defaults (the transformers-style
    encoders and DiT, whose random weights only serve before a checkpoint is loaded). One key is
    drawn from ``rngs``; layers get keys folded from it. ``rngs`` may also be a :class:`KeySource`,
    whose sequence is then continued (a subclass adding layers after its parent's).
    """

    rngs: nnx.Rngs | KeySource
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init: str = "torch"
    keys: KeySource = field(init=False, repr=False)

    def __post_init__(self):
        if self.init not in _INITS:
            raise ValueError(f"Maker init={self.init!r} is not supported; use one of {_INITS}")
        keys = self.rngs if isinstance(self.rngs, KeySource) else KeySource(self.rngs.params())
        object.__setattr__(self, "keys", keys)

    def _inits(self, fan_in: int, zero: bool = False) -> dict[str, Any]:
        """``kernel_init`` / ``bias_init`` for a layer with ``fan_in`` inputs (none: Flax's defaults)."""
        if zero:
            return dict(kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.zeros_init())
        if self.init == "flax":
            return {}
        init = torch_default_init(fan_in)
        return dict(kernel_init=init, bias_init=init)

    def conv(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding: Any = None,
             bias: bool = True, zero: bool = False) -> nnx.Conv:
        """``torch.nn.Conv2d``; ``padding`` defaults to ``kernel // 2`` on every side (low-precision kernels
        are converted where the layer runs: :mod:`jaxdiff.models.layers.weight_tie`).

        ``zero=True`` starts weights and bias at zero (ControlNet's "zero convolutions").
        """
        if padding is None:
            padding = kernel // 2
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, use_bias=bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys,
                        conv_general_dilated=weight_tie.conv_general_dilated, **self._inits(kernel * kernel * cin, zero))

    def linear(self, fin: int, fout: int, *, bias: bool = True) -> nnx.Linear:
        return nnx.Linear(fin, fout, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                          rngs=self.keys, dot_general=weight_tie.dot_general, **self._inits(fin))

    def group_norm(self, channels: int, groups: int, eps: float) -> nnx.GroupNorm:
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups; "
                             "fix block_out_channels or norm_num_groups in the config")
        return GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                         dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys)

    def layer_norm(self, features: int, eps: float, *, affine: bool = True) -> nnx.LayerNorm:
        """``torch.nn.LayerNorm``; ``affine=False`` has neither scale nor bias."""
        return nnx.LayerNorm(features, epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False,
                             dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys)

    def embed(self, num: int, features: int) -> nnx.Embed:
        """``torch.nn.Embedding`` (``N(0, 1)`` rows under ``init="torch"``)."""
        init = {} if self.init == "flax" else dict(
            embedding_init=_host_or_traced(lambda rng, shape: rng.standard_normal(shape), jax.random.normal))
        return nnx.Embed(num, features, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys, **init)


class Identity(nnx.Module):
    """Parameter-free placeholder (``nn.Identity``, ``nn.Dropout`` slots of torch Sequentials)."""

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Array:
        return x
