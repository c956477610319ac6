"""Relative position bias in the temporal attention (Ho et al. 2022 Sec. 3), a jaxdiff option of the 3-D U-Net."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models import unet3d
from jaxdiff.models._pure import PureModel
from jaxdiff.models.layers import Maker
from jaxdiff.models.layers.temporal import RelativePositionBias, TransformerTemporalModel

TINY = dict(in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
            cross_attention_dim=8, attention_head_dim=4, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
            up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"])


def _np(p) -> np.ndarray:
    return np.asarray(p[...], np.float64)


def _layer_norm(x, ln) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.epsilon) * _np(ln.scale) + _np(ln.bias)


def _linear(x, lin) -> np.ndarray:
    out = x @ _np(lin.kernel)
    return out + _np(lin.bias) if lin.bias is not None else out


def _attention(x, attn, table, max_distance) -> np.ndarray:
    """Multi-head self-attention over the frame axis of x (N, F, D) with bias table[h, clip(j - i) + M], by hand."""
    n, f, _ = x.shape
    heads = attn.heads
    q, k, v = (_linear(x, lin).reshape(n, f, heads, -1) for lin in (attn.to_q, attn.to_k, attn.to_v))
    out = np.zeros_like(q)
    for h in range(heads):
        for i in range(f):
            logits = np.array([q[:, i, h] @ k[:, j, h].T for j in range(f)]).diagonal(axis1=1, axis2=2).T  # (n, F)
            logits = logits / np.sqrt(q.shape[-1])
            logits = logits + np.array([table[h, min(max(j - i, -max_distance), max_distance) + max_distance]
                                        for j in range(f)])[None]
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, i, h] = np.einsum("nj,njd->nd", p, v[:, :, h])
    return _linear(out.reshape(n, f, -1), attn.to_out[0])


def _gelu(x) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _temporal_by_hand(layer: TransformerTemporalModel, x: np.ndarray, max_distance: int) -> np.ndarray:
    """TransformerTemporalModel's forward in numpy loops: GroupNorm over (F, H, W, C/G), proj_in, the block's two
    frame self-attentions (each with the bias) and GEGLU feed-forward, proj_out, residual."""
    b, f, hh, ww, c = x.shape
    g = layer.norm.num_groups
    xg = x.reshape(b, f, hh, ww, g, c // g)
    mu, var = xg.mean((1, 2, 3, 5), keepdims=True), xg.var((1, 2, 3, 5), keepdims=True)
    normed = ((xg - mu) / np.sqrt(var + layer.norm.epsilon)).reshape(x.shape) * _np(layer.norm.scale) \
        + _np(layer.norm.bias)
    hs = _linear(normed, layer.proj_in).transpose(0, 2, 3, 1, 4).reshape(b * hh * ww, f, -1)
    table = _np(layer.relative_position_bias.embedding)
    blk = layer.transformer_blocks[0]
    hs = hs + _attention(_layer_norm(hs, blk.norm1), blk.attn1, table, max_distance)
    hs = hs + _attention(_layer_norm(hs, blk.norm2), blk.attn2, table, max_distance)
    a, gate = np.split(_linear(_layer_norm(hs, blk.norm3), blk.ff.net[0].proj), 2, axis=-1)
    hs = hs + _linear(a * _gelu(gate), blk.ff.net[2])
    out = _linear(hs, layer.proj_out).reshape(b, hh, ww, f, c).transpose(0, 3, 1, 2, 4)
    return out + x


def test_relative_position_bias_table_lookup():
    """bias[0, h, i, j] = embedding[h, clip(j - i, -M, M) + M]: offsets beyond M share the end columns."""
    mk = Maker(nnx.Rngs(0), jnp.float32, jnp.float32)
    rpb = RelativePositionBias(3, 2, mk)
    table = np.arange(15, dtype=np.float32).reshape(3, 5)
    rpb.embedding[...] = jnp.asarray(table)
    out = np.asarray(rpb(6))
    assert out.shape == (1, 3, 6, 6)
    for h in range(3):
        for i in range(6):
            for j in range(6):
                assert out[0, h, i, j] == table[h, min(max(j - i, -2), 2) + 2]
    with pytest.raises(ValueError, match="max_distance"):
        RelativePositionBias(3, 0, mk)


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
def test_temporal_attention_with_bias_matches_hand_computation(backend):
    """A temporal transformer with a random relative bias (M = 2 < F - 1 = 4, so clipping matters) equals the
    numpy loop of its equations (<= 1e-5), on the dense and the blockwise attention paths."""
    from jaxdiff.models.attention import default_backend

    mk = Maker(nnx.Rngs(1), jnp.float32, jnp.float32)
    layer = TransformerTemporalModel(2, 4, 8, mk, norm_num_groups=4, relative_positions=2)
    rng = np.random.default_rng(0)
    layer.relative_position_bias.embedding[...] = jnp.asarray(rng.normal(0, 2.0, (2, 5)), jnp.float32)
    x = rng.normal(size=(2, 5, 3, 2, 8)).astype(np.float32)
    with default_backend(backend):
        got = np.asarray(jax.jit(lambda m, v: m(v))(PureModel.of(layer), x))
    want = _temporal_by_hand(layer, x.astype(np.float64), 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the bias matters: the same layer without it differs
    layer.relative_position_bias.embedding[...] = jnp.zeros((2, 5))
    assert np.abs(np.asarray(layer(x)) - got).max() > 1e-3


def test_zero_bias_is_the_diffusers_layer():
    """A new bias starts at zero: the layer with it equals the layer without it (same other weights)."""
    x = np.random.default_rng(0).normal(size=(1, 4, 2, 2, 8)).astype(np.float32)
    plain = TransformerTemporalModel(2, 4, 8, Maker(nnx.Rngs(3), jnp.float32, jnp.float32), norm_num_groups=4)
    biased = TransformerTemporalModel(2, 4, 8, Maker(nnx.Rngs(3), jnp.float32, jnp.float32), norm_num_groups=4,
                                      relative_positions=3)
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(biased(x)), atol=1e-6)


def test_unet3d_bias_off_by_default():
    """Default config: no bias parameters (diffusers' names only, so parity and checkpoints are untouched) and
    ``to_dict`` has no new key. With the option on, one (heads, 2M + 1) table under every temporal attention."""
    from jaxdiff.convert.torch_layout import abstract

    build = lambda d: abstract(lambda: unet3d.UNet3DConditionModel(  # noqa: E731
        unet3d.UNet3DConditionConfig.from_dict(d), rngs=nnx.Rngs(0)))
    plain, biased = build(TINY), build(dict(TINY, temporal_relative_positions=3))
    shapes = lambda m: {".".join(map(str, p)): v.shape  # noqa: E731
                        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    plain_shapes, biased_shapes = shapes(plain), shapes(biased)
    assert not any("relative_position" in n for n in plain_shapes)
    assert "temporal_relative_positions" not in plain.config.to_dict()
    assert biased.config.to_dict()["temporal_relative_positions"] == 3
    extra = {k: v for k, v in biased_shapes.items() if k not in plain_shapes}
    assert extra == {"transformer_in.relative_position_bias.embedding": (8, 7),
                     "down_blocks.0.temp_attentions.0.relative_position_bias.embedding": (2, 7),
                     "mid_block.temp_attentions.0.relative_position_bias.embedding": (4, 7),
                     "up_blocks.1.temp_attentions.0.relative_position_bias.embedding": (2, 7),
                     "up_blocks.1.temp_attentions.1.relative_position_bias.embedding": (2, 7)}
    with pytest.raises(ValueError, match="temporal_relative_positions"):
        unet3d.UNet3DConditionConfig.from_dict(dict(TINY, temporal_relative_positions=0))
