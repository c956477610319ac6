"""GLIDE's noise-aware CLIP image tower (Nichol et al. 2022, Sec. 2.4; openai/glide-text2im ``clip/``).

A ViT image encoder trained on *noised* images: the class token of CLIP's ViT is replaced by a learned
embedding of the diffusion step t (``w_t``), so ``f(x_t, t)`` embeds a noisy image into CLIP's space and its
dot product with the caption's embedding ``g(c)`` can guide sampling (:mod:`jaxdiff.clip_guidance`). Layout
(``clip/config.yaml``): 64 px, 4-pixel patches, 12 pre-norm blocks of width 12 x 64, a 512-d projection of the
step token, 1000 steps. Parameter names and layouts are openai's own (``blocks.input.{patch_proj, w_pos, w_t,
ln.g, ln.b}``, ``blocks.block_i.f_attn.{ln, f_q, f_k (no bias), f_v, f_c}``, ``blocks.block_i.f_mlp.{ln, f_1,
f_2}``, ``blocks.output.{ln, f (no bias)}``; weights ``w`` (out, in), biases ``b``, norm gains ``g``), so its
``image-enc`` checkpoint loads by name. Inputs are in [-1, 1] (VP coordinates); the tower rescales them to
0..255 and normalises by CLIP's channel statistics, as ``CLIPModel.image_embeddings`` does.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff._pytree import pytree_dataclass
from jaxdiff._util import batch_sigma, expand_to
from jaxdiff.denoisers import sigma_to_discrete_t
from jaxdiff.models.attention import attention
from jaxdiff.models.layers import config_from_dict
from jaxdiff.schedules import vp_sigmas

Array = jax.Array
CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)   # CLIP's image statistics (0..255)
CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class GlideCLIPConfig:
    """``clip/config.yaml``'s image settings (the released noise-aware CLIP's)."""

    image_size: int = 64
    patch_size: int = 4
    n_embd: int = 512
    n_head: int = 12
    n_head_state: int = 64
    n_xf_blocks: int = 12
    n_timesteps: int = 1000
    logit_scale: float = 100.0

    @classmethod
    def from_dict(cls, d: dict) -> "GlideCLIPConfig":
        return config_from_dict(cls, dict(d))

    @property
    def width(self) -> int:
        return self.n_head * self.n_head_state

    @property
    def n_context(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2


def _param(key: Array, shape: tuple[int, ...], std: float) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(key, shape, jnp.float32))


class _Keys:
    def __init__(self, rngs: nnx.Rngs):
        self.key, self.n = rngs.params(), 0

    def __call__(self) -> Array:
        self.n += 1
        return jax.random.fold_in(self.key, self.n)


class LayerNorm(nnx.Module):
    """openai's ``LayerNorm``: gain ``g``, bias ``b``, eps 1e-5, computed in float32."""

    def __init__(self, n: int):
        self.g = nnx.Param(jnp.ones((n,), jnp.float32))
        self.b = nnx.Param(jnp.zeros((n,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
        return ((x32 - mu) * jax.lax.rsqrt(var + LN_EPS) * self.g[...] + self.b[...]).astype(x.dtype)


class Affine(nnx.Module):
    """``F.linear(x, w, b)`` with ``w`` stored (out, in) as openai's ``Affine``."""

    def __init__(self, n_in: int, n_out: int, keys: _Keys, bias: bool = True):
        self.w = _param(keys(), (n_out, n_in), (2.0 / (n_in + n_out)) ** 0.5)
        self.b = nnx.Param(jnp.zeros((n_out,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = x @ self.w[...].T
        return y if self.b is None else y + self.b[...]


class AttentionResblock(nnx.Module):
    def __init__(self, cfg: GlideCLIPConfig, keys: _Keys):
        w = cfg.width
        self.heads = cfg.n_head
        self.ln = LayerNorm(w)
        self.f_q, self.f_k, self.f_v = Affine(w, w, keys), Affine(w, w, keys, bias=False), Affine(w, w, keys)
        self.f_c = Affine(w, w, keys)

    def __call__(self, m: Array) -> Array:
        b, n, w = m.shape
        r = self.ln(m)
        split = lambda y: y.reshape(b, n, self.heads, w // self.heads)  # noqa: E731
        out = attention(split(self.f_q(r)), split(self.f_k(r)), split(self.f_v(r)))
        return m + self.f_c(out.reshape(b, n, w))


class FullyConnectedResblock(nnx.Module):
    def __init__(self, cfg: GlideCLIPConfig, keys: _Keys):
        self.ln = LayerNorm(cfg.width)
        self.f_1 = Affine(cfg.width, 4 * cfg.width, keys)
        self.f_2 = Affine(4 * cfg.width, cfg.width, keys)

    def __call__(self, m: Array) -> Array:
        return m + self.f_2(jax.nn.gelu(self.f_1(self.ln(m)), approximate=False))


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: GlideCLIPConfig, keys: _Keys):
        self.f_attn = AttentionResblock(cfg, keys)
        self.f_mlp = FullyConnectedResblock(cfg, keys)

    def __call__(self, x: Array) -> Array:
        return self.f_mlp(self.f_attn(x))


class ImageEmbedding(nnx.Module):
    """Patches (a strided convolution ``patch_proj``, OIHW) after CLIP's normalisation, the step token ``w_t[t]``
    first, positions ``w_pos``, then ``ln``."""

    def __init__(self, cfg: GlideCLIPConfig, keys: _Keys):
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        w, p = cfg.width, cfg.patch_size
        self.patch_size = p
        self.patch_proj = _param(keys(), (w, 3, p, p), (2.0 / (w * p * p)) ** 0.5)
        self.w_pos = _param(keys(), (cfg.n_context, w), w ** -0.5)
        self.w_t = _param(keys(), (cfg.n_timesteps, w), w ** -0.5)
        self.ln = LayerNorm(w)

    def __call__(self, x: Array, t: Array) -> Array:
        x = ((x + 1.0) * 127.5 - jnp.asarray(CHANNEL_MEANS, x.dtype)) / jnp.asarray(CHANNEL_STDS, x.dtype)
        h = jax.lax.conv_general_dilated(x, self.patch_proj[...].astype(x.dtype), (self.patch_size,) * 2, "VALID",
                                         dimension_numbers=("NHWC", "OIHW", "NHWC"))
        b = h.shape[0]
        h = h.reshape(b, -1, h.shape[-1])
        sot = jnp.take(self.w_t[...], jnp.asarray(t, jnp.int32), axis=0)[:, None]
        return self.ln(jnp.concatenate([sot, h], axis=1) + self.w_pos[...][None])


class ImageFeatureExtractor(nnx.Module):
    def __init__(self, cfg: GlideCLIPConfig, keys: _Keys):
        self.ln = LayerNorm(cfg.width)
        self.f = Affine(cfg.width, cfg.n_embd, keys, bias=False)

    def __call__(self, x: Array) -> Array:
        return self.f(self.ln(x[:, 0]))


class _Blocks(nnx.Module):
    """openai's ``ModuleDict``: ``input``, ``block_0`` ... ``block_{n-1}``, ``output``."""

    def __init__(self, cfg: GlideCLIPConfig, keys: _Keys):
        self.n = cfg.n_xf_blocks
        self.input = ImageEmbedding(cfg, keys)
        for i in range(cfg.n_xf_blocks):
            setattr(self, f"block_{i}", TransformerBlock(cfg, keys))
        self.output = ImageFeatureExtractor(cfg, keys)


class NoisedImageEncoder(nnx.Module):
    """``encoder(x_t, t) -> (B, n_embd)``: GLIDE's noise-aware CLIP image tower (``x_t`` NHWC in VP coordinates)."""

    def __init__(self, config: GlideCLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.blocks = _Blocks(config, _Keys(rngs))

    def __call__(self, x: Array, t: Array) -> Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"x must be (B, {cfg.image_size}, {cfg.image_size}, 3), got {x.shape}")
        h = self.blocks.input(x, jnp.broadcast_to(jnp.asarray(t), (x.shape[0],)))
        for i in range(cfg.n_xf_blocks):
            h = getattr(self.blocks, f"block_{i}")(h)
        return self.blocks.output(h)


@pytree_dataclass
class NoisedCLIPEmbedding:
    """The tower as an ``image_embed(x, sigma)`` of :func:`jaxdiff.clip_guidance.clip_guidance`: EDM ``x`` mapped to
    the VP input ``x / sqrt(1 + sigma^2)`` and the (rounded) training step of ``alphas_cumprod``, unit-norm output.
    With GLIDE's ``exp(logit_scale) = 100`` in the score, the guidance scale is ``100 *`` the notebook's."""

    encoder: Any
    alphas_cumprod: Array

    def __call__(self, x: Array, sigma: Array) -> Array:
        sigma = batch_sigma(sigma, x)
        t = jnp.round(sigma_to_discrete_t(sigma, vp_sigmas(jnp.asarray(self.alphas_cumprod, sigma.dtype))))
        z = self.encoder(x * expand_to(jax.lax.rsqrt(1.0 + sigma * sigma), x), t.astype(jnp.int32))
        return z * jax.lax.rsqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-24)
