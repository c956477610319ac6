"""The one layer builder (:class:`Maker`) and the shared activation table against their references.

Flax's own default initialisers (``init="flax"``), PyTorch's ``LayerNorm`` without affine
parameters, and transformers' ``ACT2FN`` are the independent truths.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdiff.models.layers import KeySource, Maker, activation


def test_maker_flax_init_is_flax_default():
    """``init="flax"`` draws exactly what a plain ``nnx.Linear`` / ``nnx.Embed`` draws from the same keys."""
    key = jax.random.key(7)
    mk = Maker(KeySource(key), init="flax")
    ref_keys = KeySource(key)
    lin, ref_lin = mk.linear(3, 5), nnx.Linear(3, 5, rngs=ref_keys)
    emb, ref_emb = mk.embed(4, 6), nnx.Embed(4, 6, rngs=ref_keys)
    np.testing.assert_array_equal(lin.kernel[...], ref_lin.kernel[...])
    np.testing.assert_array_equal(lin.bias[...], ref_lin.bias[...])
    np.testing.assert_array_equal(emb.embedding[...], ref_emb.embedding[...])


def test_maker_continues_a_key_source():
    """A :class:`KeySource` passed as ``rngs`` is continued, not re-seeded (a subclass adds layers after its parent's)."""
    keys = KeySource(jax.random.key(1))
    keys.params()
    assert Maker(keys).keys is keys


def test_maker_rejects_unknown_init():
    with pytest.raises(ValueError, match="init='xavier'"):
        Maker(nnx.Rngs(0), init="xavier")


def test_layer_norm_without_affine_matches_torch():
    """DiT's ``elementwise_affine=False`` norm: no parameters, ``torch.nn.functional.layer_norm`` numbers."""
    norm = Maker(nnx.Rngs(0)).layer_norm(8, 1e-6, affine=False)
    assert not jax.tree.leaves(nnx.state(norm, nnx.Param))
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), eps=1e-6).numpy()
    np.testing.assert_allclose(np.asarray(norm(x)), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["quick_gelu", "gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu"])
def test_one_activation_table_matches_transformers(name):
    """The table the CLIP and T5 encoders read is transformers' ``ACT2FN`` numerically."""
    from transformers.activations import ACT2FN

    x = np.linspace(-5, 5, 101, dtype=np.float32)
    ref = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(activation(name)(x)), ref, atol=1e-6)
