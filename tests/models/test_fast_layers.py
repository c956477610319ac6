"""The speed-oriented layer implementations equal their plain definitions.

Query-chunked attention and the per-channel GroupNorm are checked against float64 numpy
written from the definitions; the text / DiT networks draw a single key from ``nnx.Rngs``.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models import clip, dit, t5
from jaxdiff.models._pure import PureModel
from jaxdiff.models.attention import attention, query_chunk
from jaxdiff.models.layers import GroupNorm

DATA = Path(__file__).resolve().parents[1] / "data" / "models"


def _attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("chunk", [None, 8, 16, 64])
def test_chunked_attention_matches_definition(chunk):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 50, 3, 4)) * 3  # 50 queries: the last chunk is padded
    k, v = rng.standard_normal((2, 2, 37, 3, 4))
    cpu = jax.jit(lambda q, k, v: attention(q, k, v, backend="cpu", q_block=chunk))
    out = cpu(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out), _attention_reference(q, k, v), atol=2e-6)


def test_query_chunk_only_for_large_logits():
    if jax.default_backend() != "cpu":
        pytest.skip("chunking is a CPU choice")
    assert query_chunk(2, 64, 8, 77) == 64  # 315 KB of logits: one block
    assert query_chunk(2, 1024, 8, 1024) == 64
    assert query_chunk(1, 40, 1, 100000) == 40  # never more queries than there are


def _group_norm_reference(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape", [(2, 5, 6, 16), (3, 7, 16)])
def test_group_norm_matches_definition(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 4 + 2  # an offset mean: a one-pass variance would lose digits
    gn = GroupNorm(16, num_groups=4, epsilon=1e-5, rngs=nnx.Rngs(0))
    scale, bias = rng.standard_normal((2, 16))
    gn.scale[...], gn.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    pm, xj = PureModel.of(gn), jnp.asarray(x, jnp.float32)
    out = np.asarray(jax.jit(lambda m, a: m(a))(pm, xj))
    np.testing.assert_allclose(out, _group_norm_reference(x, 4, scale, bias, 1e-5), atol=1e-5)
    plain = np.asarray(jax.jit(lambda m, a: nnx.GroupNorm.__call__(m.module(), a))(pm, xj))  # Flax's own path
    np.testing.assert_allclose(out, plain, atol=1e-5)


def test_group_norm_keeps_compute_dtype():
    gn = GroupNorm(8, num_groups=2, epsilon=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = jax.eval_shape(lambda m, a: m(a), PureModel.of(gn), jax.ShapeDtypeStruct((1, 3, 3, 8), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


class _CountingRngs:
    """Stands in for ``nnx.Rngs``: counts the keys drawn from it."""

    def __init__(self):
        self.draws = 0

    def params(self) -> jax.Array:
        self.draws += 1
        return jax.random.key(self.draws)


@pytest.mark.parametrize("case,cls", [("clip_text_gelu", clip.CLIPTextModelWithProjection), ("t5_relu", t5.T5EncoderModel),
                                      ("dit_a", dit.DiTTransformer2DModel), ("clip_vision", clip.CLIPVisionModelWithProjection)])
def test_networks_draw_one_key_from_rngs(case, cls):
    """Per-layer keys come from a Python counter, so ``nnx.eval_shape`` stays linear in depth."""
    cfg = cls.config_class.from_dict(json.loads((DATA / case / "config.json").read_text()))
    rngs = _CountingRngs()
    nnx.eval_shape(lambda: cls(cfg, rngs=rngs))
    assert rngs.draws == 1
