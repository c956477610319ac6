"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Compatible with diffusers' ``DiTTransformer2DModel`` (the layout of ``facebook/DiT-XL-2-256``):
patchify (``pos_embed.proj``) plus a fixed 2-D sin-cos position table, ``transformer_blocks`` with
adaLN-Zero (``norm1.emb`` embeds the timestep and class in every block, ``norm1.linear`` gives
shift/scale/gate for attention and MLP), a tanh-GELU MLP, and the adaLN final layer
(``proj_out_1`` / ``proj_out_2``) conditioned on block 0's embedding. With learned sigma the output
has ``2 * in_channels`` channels (epsilon, then the variance interpolation). Images are NHWC.

``DiTConfig.conditioning`` (a jaxdiff-only key; the default keeps diffusers' layout byte for byte) picks one of
the paper's conditioning designs (Sec. 3.2, Fig. 5) for its ablation: ``"ada_norm_zero"`` (diffusers' layout),
``"cross_attention"`` (the timestep and class embeddings as a length-two context read by a cross-attention
layer after each self-attention) or ``"in_context"`` (the two embeddings appended as extra tokens, removed before
the final layer). The last two use plain pre-LayerNorm blocks and one shared embedder (``cond_embed``), and end in
``norm_out`` + ``proj_out``. :func:`dit_init` gives the paper's initialisation for training from scratch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models import attention_control
from jaxdiff.models.attention import attention
from jaxdiff.models.attention_control import ControlRun, Site
from jaxdiff.models.layers import FeedForward, Maker, TimestepEmbedding, config_from_dict, timestep_embedding
from jaxdiff.models.layers.transformer import Attention as CrossAttention

Array = jax.Array

IGNORED_TORCH_KEYS = (r"^pos_embed\.pos_embed$",)  # the fixed sin-cos table, when a file stores it
_FEED_FORWARDS = ("gelu", "gelu-approximate")  # diffusers FeedForward activation_fn values DiT uses
CONDITIONINGS = ("ada_norm_zero", "cross_attention", "in_context")
"""The conditioning designs of the DiT paper's ablation (Sec. 3.2); the first is diffusers' layout."""


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Keys of diffusers' ``DiTTransformer2DModel`` config (defaults: diffusers' defaults, DiT-XL/2 256)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    conditioning: str = "ada_norm_zero"  # jaxdiff only: see CONDITIONINGS

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={self.conditioning!r} is not supported; use one of {CONDITIONINGS}.")
        if self.norm_type != "ada_norm_zero":
            raise ValueError(f"norm_type={self.norm_type!r} is not supported; DiT uses 'ada_norm_zero'.")
        if self.num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm (number of classes) must be set for ada_norm_zero.")
        if self.activation_fn not in _FEED_FORWARDS:
            raise ValueError(
                f"activation_fn={self.activation_fn!r} is not supported; use one of {_FEED_FORWARDS}."
            )
        if (self.num_attention_heads * self.attention_head_dim) % 4:
            raise ValueError("num_attention_heads * attention_head_dim must be divisible by 4 (2-D sin-cos table).")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiTConfig":
        """From a ``config.json`` dict (unknown keys and keys starting with ``_`` are ignored)."""
        return config_from_dict(cls, d)


# ------------------------------------------------------------------------------- fixed embeddings

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[sin(pos * w), cos(pos * w)]`` with ``w_i = 10000^(-i / (dim/2))`` (float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, height: int, width: int, base_size: int) -> np.ndarray:
    """``(height*width, dim)`` table, row-major tokens; first half encodes the column, second the row.

    Grid coordinates are rescaled to ``base_size`` (the training grid) as diffusers' ``PatchEmbed`` does.
    """
    rows = np.arange(height, dtype=np.float32) / np.float32(height / base_size)
    cols = np.arange(width, dtype=np.float32) / np.float32(width / base_size)
    col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")
    return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------- modules

class PatchEmbed(nnx.Module):
    """``proj``: non-overlapping ``p x p`` conv; adds the fixed sin-cos position table."""

    def __init__(self, cfg: DiTConfig, mk: Maker):
        p = cfg.patch_size
        self.patch_size, self.base_size, self.dim = p, cfg.sample_size // p, cfg.inner_dim
        self.proj = mk.conv(cfg.in_channels, cfg.inner_dim, p, stride=p, padding="VALID")

    def __call__(self, x: Array) -> Array:
        b, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size={p}; pad or resize the latents.")
        tokens = self.proj(x).reshape(b, (h // p) * (w // p), self.dim)
        return tokens + jnp.asarray(sincos_2d(self.dim, h // p, w // p, self.base_size), tokens.dtype)


class LabelEmbedding(nnx.Module):
    """``embedding_table``: ``num_classes + 1`` rows; the last is the learned null (unconditional) class."""

    def __init__(self, num_classes: int, dim: int, mk: Maker):
        self.embedding_table = mk.embed(num_classes + 1, dim)

    def __call__(self, labels: Array) -> Array:
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nnx.Module):
    """Timestep MLP of the 256-channel sinusoidal embedding plus the class embedding."""

    def __init__(self, num_classes: int, dim: int, mk: Maker):
        self.dtype = mk.dtype
        self.timestep_embedder = TimestepEmbedding(256, dim, mk)
        self.class_embedder = LabelEmbedding(num_classes, dim, mk)

    def __call__(self, t: Array, labels: Array) -> Array:
        # diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        temb = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
        return self.timestep_embedder(temb.astype(self.dtype)) + self.class_embedder(labels)


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero: ``linear(silu(emb))`` -> shift/scale/gate (attention), shift/scale/gate (MLP)."""

    def __init__(self, cfg: DiTConfig, mk: Maker):
        d = cfg.inner_dim
        self.emb = CombinedTimestepLabelEmbeddings(cfg.num_embeds_ada_norm, d, mk)
        self.linear = mk.linear(d, 6 * d)
        self.norm = mk.layer_norm(d, 1e-6, affine=False)

    def __call__(self, x: Array, t: Array, labels: Array) -> tuple[Array, ...]:
        params = self.linear(jax.nn.silu(self.emb(t, labels)))
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(params, 6, axis=-1)
        return modulate(self.norm(x), shift, scale), gate, shift_mlp, scale_mlp, gate_mlp


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """``x * (1 + scale) + shift`` per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nnx.Module):
    """Self-attention with ``to_q/to_k/to_v`` and ``to_out[0]`` (scale ``head_dim**-0.5``)."""

    def __init__(self, cfg: DiTConfig, mk: Maker):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.to_q = mk.linear(d, d, bias=cfg.attention_bias)
        self.to_k = mk.linear(d, d, bias=cfg.attention_bias)
        self.to_v = mk.linear(d, d, bias=cfg.attention_bias)
        self.to_out = nnx.List([mk.linear(d, d)])
        self.site = Site("", "self", self.heads)

    def __call__(self, x: Array, control: ControlRun | None = None, hw: tuple[int, int] | None = None) -> Array:
        b, n, d = x.shape
        ck = cv = x
        if control is not None:
            ck, cv = control.context(self.site, hw, x)
        split = lambda y: y.reshape(b, n, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(ck)), split(self.to_v(cv))
        if control is not None and control.explicit(self.site, hw):
            out = control.attend(self.site, hw, q, k, v)
        else:
            out = attention(q, k, v)
        return self.to_out[0](out.reshape(b, n, d))


class BasicTransformerBlock(nnx.Module):
    """diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` and no cross-attention."""

    def __init__(self, cfg: DiTConfig, mk: Maker):
        self.norm1 = AdaLayerNormZero(cfg, mk)
        self.attn1 = Attention(cfg, mk)
        self.norm3 = mk.layer_norm(cfg.inner_dim, cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        self.ff = FeedForward(cfg.inner_dim, mk, activation_fn=cfg.activation_fn)

    def __call__(self, x: Array, t: Array, labels: Array, control: ControlRun | None = None,
                 hw: tuple[int, int] | None = None) -> Array:
        h, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, t, labels)
        x = x + gate[:, None] * self.attn1(h, control, hw)
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class PlainBlock(nnx.Module):
    """Pre-LayerNorm block of the ablation's non-adaLN designs: self-attention, then (``cross_attention``) a
    cross-attention layer reading the length-two ``[time, class]`` context, then the MLP; each with a residual."""

    def __init__(self, cfg: DiTConfig, mk: Maker):
        d, eps = cfg.inner_dim, cfg.norm_eps
        self.norm1 = mk.layer_norm(d, eps)
        self.attn1 = Attention(cfg, mk)
        if cfg.conditioning == "cross_attention":
            self.norm2 = mk.layer_norm(d, eps)
            self.attn2 = CrossAttention(d, mk, heads=cfg.num_attention_heads, dim_head=cfg.attention_head_dim,
                                        cross_attention_dim=d, bias=cfg.attention_bias)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = mk.layer_norm(d, eps)
        self.ff = FeedForward(d, mk, activation_fn=cfg.activation_fn)

    def __call__(self, x: Array, context: Array | None, control: ControlRun | None = None,
                 hw: tuple[int, int] | None = None) -> Array:
        x = x + self.attn1(self.norm1(x), control, hw)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, control, hw)
        return x + self.ff(self.norm3(x))


class DiTTransformer2DModel(nnx.Module):
    """Class-conditional DiT: ``(latents NHWC, timesteps, class_labels) -> NHWC`` (``out_channels`` channels)."""

    config_class = DiTConfig

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.config = config
        mk = Maker(rngs, dtype, param_dtype, init="flax")
        d, p = config.inner_dim, config.patch_size
        self.pos_embed = PatchEmbed(config, mk)
        if config.conditioning == "ada_norm_zero":
            self.transformer_blocks = nnx.List([BasicTransformerBlock(config, mk) for _ in range(config.num_layers)])
            self.norm_out = mk.layer_norm(d, 1e-6, affine=False)
            self.proj_out_1 = mk.linear(d, 2 * d)
            self.proj_out_2 = mk.linear(d, p * p * config.output_channels)
        else:
            self.cond_embed = CombinedTimestepLabelEmbeddings(config.num_embeds_ada_norm, d, mk)
            self.transformer_blocks = nnx.List([PlainBlock(config, mk) for _ in range(config.num_layers)])
            self.norm_out = mk.layer_norm(d, 1e-6)
            self.proj_out = mk.linear(d, p * p * config.output_channels)
        attention_control.assign_sites(self)

    def __call__(self, latents: Array, timesteps: Array, class_labels: Array, *, control: Any = None,
                 return_records: bool = False) -> Any:
        """``timesteps``: ``(batch,)`` or a scalar (DDPM steps, may be fractional); ``class_labels``: ``(batch,)``
        ints in ``[0, num_embeds_ada_norm]``, where ``num_embeds_ada_norm`` is the null class for guidance.
        ``control`` / ``return_records``: attention control (:mod:`jaxdiff.models.attention_control`);
        the query grid of every site is the patch grid."""
        if latents.ndim != 4 or latents.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"latents must be NHWC with {self.config.in_channels} channels, got shape {latents.shape}."
            )
        b, h, w, _ = latents.shape
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        labels = jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (b,))
        x = self.pos_embed(latents)
        run, grid = attention_control.start(control), (h // self.config.patch_size, w // self.config.patch_size)
        if self.config.conditioning == "ada_norm_zero":
            for block in self.transformer_blocks:
                x = block(x, t, labels, run, grid)
            cond = self.transformer_blocks[0].norm1.emb(t, labels)
            shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(cond)), 2, -1)
            x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))
        else:
            x = self._plain_blocks(x, t, labels, run, grid)
        out = unpatchify(x, h // self.config.patch_size, w // self.config.patch_size, self.config.patch_size)
        return attention_control.finish(out, run, return_records)

    def _plain_blocks(self, x: Array, t: Array, labels: Array, run: ControlRun | None,
                      grid: tuple[int, int]) -> Array:
        """The cross-attention and in-context designs: ``[time, class]`` embeddings as a context or as tokens."""
        emb = self.cond_embed
        temb = emb.timestep_embedder(timestep_embedding(t, 256, flip_sin_to_cos=True,
                                                        downscale_freq_shift=1).astype(emb.dtype))
        tokens = jnp.stack([temb, emb.class_embedder(labels)], axis=1)  # (B, 2, D)
        n = x.shape[1]
        if self.config.conditioning == "in_context":
            x, context, grid = jnp.concatenate([tokens.astype(x.dtype), x], axis=1), None, None
        else:
            context = tokens.astype(x.dtype)
        for block in self.transformer_blocks:
            x = block(x, context, run, grid)
        return self.proj_out(self.norm_out(x[:, -n:]))  # in-context: the two extra tokens are dropped here

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        return key

    @classmethod
    def from_pretrained_tensors(
        cls, config: Mapping[str, Any] | DiTConfig, tensors: Mapping[str, Any],
        *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ) -> "DiTTransformer2DModel":
        """Build abstractly from a ``config.json`` dict (or config) and fill from torch-named ``tensors``."""
        return from_pretrained_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype)


def unpatchify(x: Array, h: int, w: int, p: int) -> Array:
    """``(B, h*w, p*p*C)`` tokens (row-major, each ``(p, p, C)``) -> ``(B, h*p, w*p, C)``."""
    b, _, k = x.shape
    c = k // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def from_pretrained_tensors(
    config: Mapping[str, Any] | DiTConfig, tensors: Mapping[str, Any],
    *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
) -> DiTTransformer2DModel:
    """:class:`DiTTransformer2DModel` from a ``config.json`` dict and torch-named tensors (no second weight copy)."""
    return build_from_tensors(DiTTransformer2DModel, DiTConfig, config, tensors, ignore=IGNORED_TORCH_KEYS, dtype=dtype,
                              param_dtype=param_dtype)


def dit_init(model: DiTTransformer2DModel, seed: int = 0) -> DiTTransformer2DModel:
    """The DiT paper's initialisation for training from scratch (Sec. 3.2 and its released ``initialize_weights``),
    in place: Xavier-uniform linear weights and zero biases, the patch projection Xavier-uniform as a linear map,
    ``N(0, 0.02)`` label and timestep-MLP weights, and zero for the output projection and, for adaLN-Zero, every
    block's modulation (``norm1.linear``) and the final layer's (``proj_out_1``): each block starts as the identity.
    """
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        name = ".".join(map(str, path))
        value = var.get_value()
        shape = value.shape
        if name.endswith("bias") or name.startswith(("proj_out_1.", "proj_out_2.", "proj_out.")) \
                or ".norm1.linear." in name:
            new = np.zeros(shape)
        elif "embedding_table" in name or "timestep_embedder" in name:
            new = rng.normal(0.0, 0.02, shape)
        elif name.endswith("kernel"):
            fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            new = rng.uniform(-limit, limit, shape)
        else:  # LayerNorm scales stay 1
            continue
        var.set_value(jnp.asarray(new, value.dtype))
    return model
