"""Low-precision kernels tied to their layer's input (jaxdiff.models.layers.weight_tie)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.layers import Maker, weight_tie


class ConvStack(nnx.Module):
    def __init__(self, n: int, channels: int, dtype):
        mk = Maker(nnx.Rngs(0), dtype, dtype)
        self.convs = nnx.List([mk.conv(channels, channels, 3) for _ in range(n)])
        self.out = mk.linear(channels, 8)

    def __call__(self, x):
        for conv in self.convs:
            x = jax.nn.silu(conv(x))
        return self.out(x)


def _forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)), state


def test_ties_add_exactly_zero_even_with_non_finite_inputs():
    model = ConvStack(3, 16, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16), jnp.bfloat16)
    x_bad = x.at[0, 0, 0, 0].set(jnp.nan)
    tied, state = _forward(model)
    with weight_tie.untied():
        untied, _ = _forward(model)
        want, want_bad = untied(state, x), untied(state, x_bad)
    np.testing.assert_array_equal(np.asarray(tied(state, x), np.float32), np.asarray(want, np.float32))
    got_bad = np.asarray(tied(state, x_bad), np.float32)
    np.testing.assert_array_equal(got_bad, np.asarray(want_bad, np.float32))
    assert np.isfinite(got_bad[1]).all()  # the NaN of image 0 does not reach image 1 through the tie


def test_float32_kernels_are_not_tied():
    model = ConvStack(2, 8, jnp.float32)
    graphdef, state = nnx.split(model)
    x = jnp.ones((1, 4, 4, 8))
    fn = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    tied = str(jax.make_jaxpr(fn)(state, x))
    with weight_tie.untied():
        untied = str(jax.make_jaxpr(fn)(state, x))
    assert tied == untied


def test_ties_keep_bfloat16_kernel_copies_from_piling_up():
    """XLA:CPU's default scheduler converts every bf16 kernel to float32 early when nothing ties it to its layer."""
    model = nnx.eval_shape(lambda: ConvStack(8, 256, jnp.bfloat16))
    graphdef, state = nnx.split(model)
    spec = jax.ShapeDtypeStruct((1, 16, 16, 256), jnp.bfloat16)
    fn = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    tied = jax.jit(fn).lower(state, spec).compile().memory_analysis().temp_size_in_bytes
    with weight_tie.untied():
        untied = jax.jit(lambda st, x: fn(st, x) + 0).lower(state, spec).compile().memory_analysis().temp_size_in_bytes
    kernel_f32 = 3 * 3 * 256 * 256 * 4
    # 8 layers: tied, at most the copies of the layers running (1.2 measured); untied 8.2 here (jax 0.10.2)
    assert tied <= 2.5 * kernel_f32, (tied / kernel_f32, untied / kernel_f32)
