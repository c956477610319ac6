"""The one attention function: every backend equals the definition, "auto" picks by shape, and
the blockwise backend's compiled temporaries do not grow with T_q * T_k.

The reference is float64 numpy written from ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models import attention as attn
from jaxdiff.models.attention import attention, choose_backend, default_backend, set_default_backend
from jaxdiff.models.layers import Attention, Maker


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(b: int, tq: int, tk: int, h: int, d: int, seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, h, d)) * 2  # peaked softmax rows: the running max matters
    k, v = rng.standard_normal((2, b, tk, h, d))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _run(backend: str, q, k, v, **kw):
    return jax.jit(lambda q, k, v: attention(q, k, v, backend=backend, **kw))(q, k, v)


# (B, T_q, T_k, heads, d, q_block, k_block): lengths that are and are not multiples of the blocks,
# cross-attention with T_k != T_q (77 text tokens), one key block, one query block.
SHAPES = [
    (2, 64, 64, 2, 8, 16, 16),
    (2, 50, 37, 3, 4, 16, 8),
    (1, 100, 77, 2, 8, 32, 32),
    (1, 33, 200, 1, 16, 64, 64),
    (2, 7, 5, 2, 8, 64, 1024),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_equals_definition_float32(shape):
    b, tq, tk, h, d, qb, kb = shape
    q, k, v = _qkv(b, tq, tk, h, d)
    out = _run("blockwise", q, k, v, q_block=qb, k_block=kb)
    assert out.shape == (b, tq, h, d) and out.dtype == jnp.float32
    ref = _reference(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_run("cpu", q, k, v)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_blockwise_bfloat16_as_accurate_as_the_dense_kernel(shape):
    b, tq, tk, h, d, qb, kb = shape
    q, k, v = _qkv(b, tq, tk, h, d, seed=1, dtype=jnp.bfloat16)
    ref = _reference(*(np.asarray(a.astype(jnp.float32)) for a in (q, k, v)))
    blockwise = np.asarray(_run("blockwise", q, k, v, q_block=qb, k_block=kb).astype(jnp.float32))
    dense = np.asarray(_run("cpu", q, k, v).astype(jnp.float32))
    err_blockwise, err_dense = np.abs(blockwise - ref).max(), np.abs(dense - ref).max()
    assert err_blockwise <= 2e-2 and err_blockwise <= 2 * err_dense + 4e-3, (err_blockwise, err_dense)


def test_xla_backend_equals_cpu_backend():
    q, k, v = _qkv(2, 50, 37, 3, 8, seed=2)
    xla = np.asarray(_run("xla", q, k, v))
    np.testing.assert_allclose(xla, np.asarray(_run("cpu", q, k, v)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xla, _reference(q, k, v), rtol=1e-5, atol=1e-6)


def _uses_scan(fn, *args) -> bool:
    """Whether ``fn`` traces to a scan (a fresh wrapper each time: jax caches traces per callable)."""
    return "scan" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_auto_goes_blockwise_past_the_budget():
    logits = attn.dense_logits_bytes(2, 16, 4096, 4096)
    assert choose_backend(2, 16, 4096, 4096, 40, jnp.bfloat16, platform="cpu") == "blockwise"
    assert choose_backend(2, 16, 4096, 4096, 40, jnp.float32, platform="cpu", budget=logits) == "cpu"
    assert choose_backend(2, 16, 4096, 4096, 64, jnp.bfloat16, platform="gpu") == "cudnn"
    assert choose_backend(2, 16, 4096, 4096, 40, jnp.float32, platform="gpu") == "xla"
    assert choose_backend(2, 16, 4096, 4096, 40, jnp.float32, platform="tpu") == "blockwise"
    assert choose_backend(2, 16, 64, 77, 40, jnp.float32, platform="tpu") == "xla"
    if jax.default_backend() != "cpu":
        pytest.skip("the budget rule below is the CPU choice")
    q, k, v = _qkv(1, 50, 40, 2, 8, seed=3)
    small = lambda q, k, v: attention(q, k, v, backend="auto", budget=64)  # noqa: E731
    assert _uses_scan(small, q, k, v)  # blockwise: a scan over key blocks
    assert not _uses_scan(lambda q, k, v: attention(q, k, v, backend="auto"), q, k, v)  # one dense block
    np.testing.assert_allclose(np.asarray(jax.jit(small)(q, k, v)), _reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_default_backend_override_and_per_layer_choice():
    if jax.default_backend() != "cpu":
        pytest.skip("small inputs run as one dense block on CPU only")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 20, 16)), jnp.float32)
    layer = Attention(16, Maker(nnx.Rngs(0)), heads=2, dim_head=8)
    pinned = Attention(16, Maker(nnx.Rngs(0)), heads=2, dim_head=8, attention_backend="cpu")
    assert not _uses_scan(layer, x)
    with default_backend("blockwise"):
        assert attn.get_default_backend() == "blockwise"
        assert _uses_scan(layer, x)
        assert not _uses_scan(pinned, x)  # the layer's own choice wins
        np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(pinned(x)), rtol=1e-5, atol=1e-6)
    assert attn.get_default_backend() == "auto"
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_default_backend("flash")
    with pytest.raises(ValueError, match="cudnn attention backend needs"):
        attention(*_qkv(1, 4, 4, 1, 4), backend="cudnn")


def _temp_bytes(backend: str, shape: tuple[int, ...], **kw) -> int:
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, backend=backend, **kw))
    return fn.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_temp_memory_does_not_grow_with_the_logits():
    logits = attn.dense_logits_bytes(1, 2, 4096, 4096)  # 128 MiB
    dense = _temp_bytes("xla", (1, 4096, 2, 32))  # jax.nn.dot_product_attention materialises the logits
    blockwise = _temp_bytes("blockwise", (1, 4096, 2, 32))
    longer = _temp_bytes("blockwise", (1, 8192, 2, 32))
    assert dense >= logits  # the measure sees materialised logits
    assert blockwise < logits / 16, (blockwise, logits)
    assert longer < 3 * blockwise, (longer, blockwise)  # linear in T (padded copies), not quadratic


# --- additive bias, boolean mask, causal: every backend against a dense float64 reference ------------

def _reference_masked(q, k, v, scale=None, bias=None, mask=None, causal=False) -> np.ndarray:
    """``softmax(q k^T * scale + bias)`` with masked logits at ``jax.nn.dot_product_attention``'s finite
    large negative (a row with every key masked averages the values), in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones(logits.shape, bool)
    if mask is not None:
        keep &= np.asarray(mask, bool)
    if causal:
        keep &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(keep, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _bias_mask(b, h, tq, tk, seed, bias_shape, mask_kind):
    rng = np.random.default_rng(seed)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape(b, h, tq, tk)).astype(np.float32) * 3
    if mask_kind == "padding":  # keys past each row's length, (B, 1, 1, T_k)
        lengths = np.array([tk, max(1, tk // 3)][:b])
        mask = (np.arange(tk)[None] < lengths[:, None])[:, None, None, :]
    elif mask_kind == "random":  # a full (B, heads, T_q, T_k) mask; query 0 of batch 0 sees no key at all
        mask = rng.random((b, h, tq, tk)) < 0.6
        mask[0, :, 0, :] = False
    else:
        mask = None
    return bias, mask


MASK_CASES = [  # (B, T_q, T_k, heads, d, bias shape, mask, causal)
    (2, 50, 37, 3, 4, lambda b, h, tq, tk: (1, h, tq, tk), "padding", False),  # T5: shared bias, padding mask
    (2, 40, 40, 2, 8, None, "padding", True),  # CLIP: causal and padding
    (2, 33, 70, 2, 8, lambda b, h, tq, tk: (b, 1, 1, tk), "random", False),  # per-key bias, full mask
    (1, 70, 70, 2, 8, lambda b, h, tq, tk: (h, tq, tk), None, True),  # 3-d bias, causal only
]


@pytest.mark.parametrize("backend", ["cpu", "xla", "blockwise"])
@pytest.mark.parametrize("case", range(len(MASK_CASES)))
def test_bias_and_mask_equal_the_definition_on_every_backend(backend, case):
    b, tq, tk, h, d, bias_shape, mask_kind, causal = MASK_CASES[case]
    q, k, v = _qkv(b, tq, tk, h, d, seed=10 + case)
    bias, mask = _bias_mask(b, h, tq, tk, 20 + case, bias_shape, mask_kind)
    ref = _reference_masked(q, k, v, 0.7, bias, mask, causal)
    # small tiles: several query and key blocks, neither length a multiple of them, so the slicing is exercised
    for kw in ({}, {"q_block": 16, "k_block": 16}):
        out = _run(backend, q, k, v, scale=0.7, bias=bias, mask=mask, is_causal=causal, **kw)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-6, err_msg=f"{backend} {kw}")


def test_causal_needs_square_attention():
    with pytest.raises(ValueError, match="is_causal needs as many queries as keys"):
        attention(*_qkv(1, 4, 5, 1, 4), is_causal=True)


def test_no_mask_path_is_unchanged():
    """Without bias, mask or causal the kernels trace exactly as before: the plain call and the call
    spelling the defaults out give one jaxpr, with no select, on the dense and the blockwise backends."""
    q, k, v = _qkv(1, 40, 30, 2, 8)
    for backend in ("cpu", "blockwise"):
        plain = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, backend=backend, q_block=16, k_block=8))(q, k, v))
        spelled = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, backend=backend, q_block=16, k_block=8,
                                                               bias=None, mask=None, is_causal=False))(q, k, v))
        assert plain == spelled
        assert "dynamic_slice" not in plain
    assert "select_n" not in str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, backend="cpu"))(q, k, v))
