"""T5 encoder (Raffel et al. 2020; v1.1 gated-GELU variant), compatible with ``transformers.T5EncoderModel``.

Parameter names mirror transformers (``encoder.block.0.layer.0.SelfAttention.q``,
``encoder.block.0.layer.1.DenseReluDense.wi_0`` ...). T5 particulars: RMS layer norm without mean
subtraction or bias, no ``1/sqrt(d)`` attention scaling, a learned relative position bias (bucketed
bidirectional distances) computed by the first block and shared by all blocks. The token embedding
``shared`` is tied to ``encoder.embed_tokens`` and stored once.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models.attention import attention
from jaxdiff.models.layers import ACTIVATIONS, Maker, config_from_dict

Array = jax.Array

IGNORED_TORCH_KEYS = (r"^decoder\.", r"^lm_head\.")
# ACT of feed_forward_proj "ACT" / "gated-ACT" (functions from the shared table)
FEED_FORWARD_ACTS = ("gelu", "gelu_new", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Keys of transformers' ``T5Config`` used by the encoder (defaults: transformers' defaults, t5-small)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        ok = (len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")) and parts[-1] in FEED_FORWARD_ACTS
        if not ok:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use 'ACT' or 'gated-ACT' with ACT in "
                f"{list(FEED_FORWARD_ACTS)} (T5 v1.0: 'relu', v1.1 / flan: 'gated-gelu')."
            )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act(self) -> str:
        """transformers maps ``gated-gelu`` to the tanh approximation ``gelu_new``."""
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        """From a ``config.json`` dict (unknown keys and keys starting with ``_`` are ignored)."""
        return config_from_dict(cls, d)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of ``key_pos - query_pos``: half the buckets per sign, exact below
    ``num_buckets // 4``, logarithmic up to ``max_distance``, clipped beyond (float32 as the reference)."""
    half = num_buckets // 2
    sign = (relative_position > 0).astype(np.int64) * half
    n = np.abs(relative_position)
    max_exact = half // 2
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return sign + np.where(n < max_exact, n, large)


class T5LayerNorm(nnx.Module):
    """RMS norm (no mean subtraction, no bias), statistics in float32: ``weight * x / rms(x)``."""

    def __init__(self, dim: int, eps: float, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * h).astype(self.dtype)



class T5Attention(nnx.Module):
    """Unscaled multi-head attention; the first block owns ``relative_attention_bias``."""

    def __init__(self, cfg: T5Config, has_bias: bool, mk: Maker):
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.q = mk.linear(cfg.d_model, inner, bias=False)
        self.k = mk.linear(cfg.d_model, inner, bias=False)
        self.v = mk.linear(cfg.d_model, inner, bias=False)
        self.o = mk.linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = mk.embed(self.buckets, cfg.num_heads)

    def position_bias(self, length: int) -> Array:
        """``(1, heads, length, length)`` bias from the bucketed relative positions."""
        pos = np.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.buckets, self.max_distance)
        return jnp.transpose(self.relative_attention_bias(jnp.asarray(buckets)), (2, 0, 1))[None]

    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.d_kv)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = attention(q, k, v, bias=bias, mask=mask, scale=1.0)
        return self.o(out.reshape(b, t, self.heads * self.d_kv))


class T5LayerSelfAttention(nnx.Module):
    """``x + SelfAttention(layer_norm(x))``."""

    def __init__(self, cfg: T5Config, has_bias: bool, mk: Maker):
        self.SelfAttention = T5Attention(cfg, has_bias, mk)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, mk.dtype, mk.param_dtype)

    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        return x + self.SelfAttention(self.layer_norm(x), bias, mask)


class T5DenseActDense(nnx.Module):
    """``wo(act(wi x))`` (T5 v1.0)."""

    def __init__(self, cfg: T5Config, mk: Maker):
        self.act = cfg.dense_act
        self.wi = mk.linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = mk.linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x: Array) -> Array:
        return self.wo(ACTIVATIONS[self.act](self.wi(x)))


class T5DenseGatedActDense(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1, flan-T5)."""

    def __init__(self, cfg: T5Config, mk: Maker):
        self.act = cfg.dense_act
        self.wi_0 = mk.linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = mk.linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = mk.linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x: Array) -> Array:
        return self.wo(ACTIVATIONS[self.act](self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nnx.Module):
    """``x + DenseReluDense(layer_norm(x))``."""

    def __init__(self, cfg: T5Config, mk: Maker):
        ff = T5DenseGatedActDense if cfg.is_gated else T5DenseActDense
        self.DenseReluDense = ff(cfg, mk)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, mk.dtype, mk.param_dtype)

    def __call__(self, x: Array) -> Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """``layer = [self-attention, feed-forward]``."""

    def __init__(self, cfg: T5Config, has_bias: bool, mk: Maker):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_bias, mk), T5LayerFF(cfg, mk)])

    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        return self.layer[1](self.layer[0](x, bias, mask))


class T5Stack(nnx.Module):
    """``encoder``: blocks and ``final_layer_norm``; token embeddings come from the tied ``shared`` table."""

    def __init__(self, cfg: T5Config, mk: Maker):
        self.block = nnx.List([T5Block(cfg, i == 0, mk) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, mk.dtype, mk.param_dtype)

    def __call__(self, x: Array, attention_mask: Array | None) -> Array:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
        for blk in self.block:
            x = blk(x, bias, mask)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """Compatible with ``transformers.T5EncoderModel``: ``(input_ids, attention_mask) -> last_hidden_state``."""

    config_class = T5Config

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.config = config
        mk = Maker(rngs, dtype, param_dtype, init="flax")
        self.shared = mk.embed(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, mk)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """``(batch, length)`` token ids and optional 1/0 padding mask -> ``(batch, length, d_model)``."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {input_ids.shape}.")
        return self.encoder(self.shared(input_ids), attention_mask)

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        """``encoder.embed_tokens.weight`` duplicates the tied ``shared.weight``: dropped."""
        return None if key == "encoder.embed_tokens.weight" else key

    @classmethod
    def from_pretrained_tensors(
        cls, config: Mapping[str, Any] | T5Config, tensors: Mapping[str, Any],
        *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ) -> "T5EncoderModel":
        """Build abstractly from a ``config.json`` dict (or config) and fill from torch-named ``tensors``."""
        return from_pretrained_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype)


def from_pretrained_tensors(
    config: Mapping[str, Any] | T5Config, tensors: Mapping[str, Any],
    *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
) -> T5EncoderModel:
    """:class:`T5EncoderModel` from a ``config.json`` dict and torch-named tensors (no second weight copy)."""
    rename = T5EncoderModel.rename_torch_key
    if "shared.weight" not in tensors.keys():  # files that store only the encoder's copy of the tied table
        rename = lambda k: "shared.weight" if k == "encoder.embed_tokens.weight" else k  # noqa: E731
    return build_from_tensors(T5EncoderModel, T5Config, config, tensors, rename=rename, ignore=IGNORED_TORCH_KEYS,
                              dtype=dtype, param_dtype=param_dtype)
