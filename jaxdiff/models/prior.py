"""The unCLIP diffusion prior (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP
Latents", Sec. 2.2): a decoder-only transformer from a CLIP text embedding to a CLIP image embedding.

Compatible with diffusers' ``PriorTransformer`` (the layout of ``kakaobrain/karlo-v1-alpha``'s ``prior/`` and of
Kandinsky's priors), so its safetensors load by name. The input sequence is, in order (paper, Sec. 2.2: "the encoded
text, the CLIP text embedding, an embedding for the diffusion timestep, the noised CLIP image embedding, and a final
embedding whose output from the Transformer is used to predict the unnoised CLIP image embedding"):

- ``encoder_hidden_states_proj(text_states)`` (the text encoder's last hidden states, ``num_embeddings`` tokens);
- ``embedding_proj(text_embeds)`` (after the optional ``embedding_proj_norm``);
- ``time_embedding(sinusoid(t))`` (``time_proj``: flip_sin_to_cos, shift 0);
- ``proj_in(noisy image embedding)``;
- ``prd_embedding`` (learned, the output token),

plus ``positional_embedding``; then the optional ``norm_in``, ``transformer_blocks`` (pre-LayerNorm self-attention
and GELU MLP, diffusers' ``BasicTransformerBlock`` without cross-attention) under a causal mask combined with the
text padding mask, ``norm_out``, and ``proj_to_clip_embeddings`` of the last token. The network predicts the clean
(standardised) embedding (``prediction_type="sample"``); :meth:`PriorTransformer.post_process_latents` maps it to
CLIP's scale with ``clip_std`` / ``clip_mean``.

As in diffusers, the masks are additive ``-10000`` logits and apply only when a text mask is given (without one
the attention is full, not causal). :class:`PriorNet` is the ``net(x, t, cond)`` form the denoisers and the
training losses take (``cond``: ``text_embeds``, ``text_states``, ``text_mask``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models.layers import FeedForward, Maker, activation, batch_timesteps, config_from_dict, timestep_embedding
from jaxdiff.models.layers.transformer import Attention

Array = jax.Array

MASK_VALUE = -10000.0  # diffusers' additive mask logit (causal and padding)
NORM_TYPES = (None, "layer")
ADDED_EMB_TYPES = (None, "prd")
ENCODER_HID_PROJ_TYPES = (None, "linear")
COND_KEYS = ("text_embeds", "text_states", "text_mask")


@dataclasses.dataclass(frozen=True)
class PriorTransformerConfig:
    """Keys of diffusers' ``PriorTransformer`` config (defaults: diffusers' defaults, karlo's prior)."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("norm_in_type", NORM_TYPES), ("embedding_proj_norm_type", NORM_TYPES),
                              ("encoder_hid_proj_type", ENCODER_HID_PROJ_TYPES), ("added_emb_type", ADDED_EMB_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {allowed}.")
        activation(self.time_embed_act_fn)  # raises on an unknown name

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def sequence_length(self) -> int:
        return self.num_embeddings + self.additional_embeddings

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PriorTransformerConfig":
        """From a ``config.json`` dict (unknown keys and keys starting with ``_`` are ignored)."""
        return config_from_dict(cls, d)


class TimeMLP(nnx.Module):
    """diffusers ``TimestepEmbedding(in, hidden, out_dim=out)``: ``linear_2(act(linear_1(x)))``."""

    def __init__(self, fin: int, hidden: int, fout: int, act: str, mk: Maker):
        self.linear_1 = mk.linear(fin, hidden)
        self.linear_2 = mk.linear(hidden, fout)
        self.act = activation(act)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(self.act(self.linear_1(x)))


class PriorBlock(nnx.Module):
    """``x + attn1(norm1(x))``, then ``x + ff(norm3(x))`` (biased q/k/v, GELU MLP; names as diffusers')."""

    def __init__(self, cfg: PriorTransformerConfig, mk: Maker):
        d = cfg.inner_dim
        self.norm1 = mk.layer_norm(d, 1e-5)
        self.attn1 = Attention(d, mk, heads=cfg.num_attention_heads, dim_head=cfg.attention_head_dim, bias=True)
        self.norm3 = mk.layer_norm(d, 1e-5)
        self.ff = FeedForward(d, mk, activation_fn="gelu")

    def __call__(self, x: Array, bias: Array | None) -> Array:
        x = x + self.attn1(self.norm1(x), bias=bias)
        return x + self.ff(self.norm3(x))


def attention_bias(text_mask: Array, additional: int, dtype: Any = jnp.float32) -> Array:
    """The additive logit bias (B, 1, T, T): ``-10000`` where a key is padding text (``text_mask`` False) plus
    ``-10000`` above the diagonal (causal), ``T = len(text) + additional`` (the added tokens are never padding)."""
    pad = (1.0 - jnp.asarray(text_mask, dtype)) * MASK_VALUE
    pad = jnp.pad(pad, ((0, 0), (0, additional)))
    t = pad.shape[1]
    causal = jnp.triu(jnp.full((t, t), MASK_VALUE, dtype), 1)
    return (pad[:, None, :] + causal[None])[:, None]


class PriorTransformer(nnx.Module):
    """``(noisy image embedding (B, D), t, text embedding (B, D'), text states (B, T, D), text mask (B, T))
    -> predicted clean image embedding (B, clip_embed_dim)``, standardised (see :meth:`post_process_latents`)."""

    config_class = PriorTransformerConfig

    def __init__(self, config: PriorTransformerConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = cfg = config
        mk = Maker(rngs, dtype, param_dtype)
        d = cfg.inner_dim
        proj_dim = cfg.embedding_proj_dim or cfg.embedding_dim
        clip_dim = cfg.clip_embed_dim or cfg.embedding_dim
        self.dtype = dtype
        self.time_embedding = TimeMLP(d, cfg.time_embed_dim or d, d, cfg.time_embed_act_fn, mk)
        self.proj_in = mk.linear(cfg.embedding_dim, d)
        self.embedding_proj_norm = mk.layer_norm(proj_dim, 1e-5) if cfg.embedding_proj_norm_type else None
        self.embedding_proj = mk.linear(proj_dim, d)
        self.encoder_hidden_states_proj = mk.linear(cfg.embedding_dim, d) if cfg.encoder_hid_proj_type else None
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))  # noqa: E731 (diffusers starts them at 0)
        self.positional_embedding = zeros(1, cfg.sequence_length, d)
        self.prd_embedding = zeros(1, 1, d) if cfg.added_emb_type == "prd" else None
        self.transformer_blocks = nnx.List([PriorBlock(cfg, mk) for _ in range(cfg.num_layers)])
        self.norm_in = mk.layer_norm(d, 1e-5) if cfg.norm_in_type else None
        self.norm_out = mk.layer_norm(d, 1e-5)
        self.proj_to_clip_embeddings = mk.linear(d, clip_dim)
        self.clip_mean = zeros(1, clip_dim)
        self.clip_std = zeros(1, clip_dim)

    def __call__(self, hidden_states: Array, timestep: Any, proj_embedding: Array,
                 encoder_hidden_states: Array | None = None, attention_mask: Array | None = None) -> Array:
        """diffusers' ``forward``: ``timestep`` a scalar or (B,) (DDPM steps); ``attention_mask`` (B, T) booleans
        (True: a real text token) switches on the causal + padding mask."""
        cfg = self.config
        b = hidden_states.shape[0]
        t = batch_timesteps(timestep, b)
        temb = self.time_embedding(timestep_embedding(t, cfg.inner_dim, flip_sin_to_cos=True,
                                                      downscale_freq_shift=0).astype(self.dtype))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens = []
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("this prior projects encoder_hidden_states (encoder_hid_proj_type='linear'): pass "
                                 "the text encoder's last hidden states (B, T, embedding_dim)")
            tokens.append(self.encoder_hidden_states_proj(encoder_hidden_states))
        elif encoder_hidden_states is not None:
            tokens.append(encoder_hidden_states)
        tokens += [self.embedding_proj(proj_embedding)[:, None], temb[:, None], self.proj_in(hidden_states)[:, None]]
        if self.prd_embedding is not None:
            tokens.append(jnp.broadcast_to(self.prd_embedding[...].astype(tokens[-1].dtype), (b, 1, cfg.inner_dim)))
        n_text = 0 if encoder_hidden_states is None else tokens[0].shape[1]
        before_x = n_text + 2  # text tokens, the text embedding and the time token
        x = jnp.concatenate(tokens, axis=1)
        pos = self.positional_embedding[...].astype(x.dtype)
        if pos.shape[1] < x.shape[1]:  # diffusers: a table without the added tokens is padded with zeros for them
            pos = jnp.pad(pos, ((0, 0), (before_x, 1 if self.prd_embedding is not None else 0), (0, 0)))
        if pos.shape[1] != x.shape[1]:
            raise ValueError(f"the prior was configured for {pos.shape[1]} tokens (num_embeddings="
                             f"{cfg.num_embeddings} text tokens + {cfg.additional_embeddings}) but got {x.shape[1]}: "
                             f"pad or truncate the text states to {cfg.num_embeddings} tokens")
        x = x + pos
        bias = None
        if attention_mask is not None:
            bias = attention_bias(attention_mask, cfg.additional_embeddings, x.dtype)
        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, bias)
        x = self.norm_out(x)
        x = x[:, -1] if self.prd_embedding is not None else x[:, before_x:]
        return self.proj_to_clip_embeddings(x)

    def post_process_latents(self, latents: Array) -> Array:
        """Standardised -> CLIP scale: ``latents * clip_std + clip_mean``."""
        return latents * self.clip_std[...] + self.clip_mean[...]

    def pre_process_latents(self, embeds: Array) -> Array:
        """CLIP scale -> standardised (the training target): ``(embeds - clip_mean) / clip_std``."""
        return (embeds - self.clip_mean[...]) / self.clip_std[...]

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        return key

    @classmethod
    def from_pretrained_tensors(cls, config: Mapping[str, Any] | PriorTransformerConfig, tensors: Mapping[str, Any],
                                *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> "PriorTransformer":
        """Build abstractly from a ``config.json`` dict (or config) and fill from torch-named ``tensors``."""
        return build_from_tensors(cls, PriorTransformerConfig, config, tensors, dtype=dtype, param_dtype=param_dtype)


@pytree_dataclass
class PriorNet:
    """The prior as ``net(x, t, cond)`` for :class:`jaxdiff.denoisers.DiscreteVPDenoiser` (``prediction="sample"``)
    and the training losses: ``cond`` a dict with ``text_embeds`` (B, D'), ``text_states`` (B, T, D) and optionally
    ``text_mask`` (B, T). ``model`` is a pytree callable (:class:`jaxdiff.models._pure.PureModel` of a
    :class:`PriorTransformer`), so the weights are traced leaves (and differentiable)."""

    model: Any

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        if not isinstance(cond, Mapping) or "text_embeds" not in cond:
            raise TypeError(f"the prior's conditioning is a dict with keys {COND_KEYS} (text_mask optional), "
                            f"got {type(cond).__name__}")
        return self.model(x, t, cond["text_embeds"], cond.get("text_states"), cond.get("text_mask"))
