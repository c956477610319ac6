"""unCLIP's decoder conditioning (Ramesh et al. 2022, Sec. 2.1): the CLIP image embedding as extra context tokens
and as an addition to the time embedding. Compatible with diffusers' ``UnCLIPTextProjModel`` (karlo's
``text_proj/``).

"We modify the architecture described in Nichol et al. (2021) by projecting and adding CLIP embeddings to the
existing timestep embedding, and by projecting CLIP embeddings into four extra tokens of context that are
concatenated to the sequence of outputs from the GLIDE text encoder." Here:

- ``additive = embedding_proj(text_embeds) + clip_image_embeddings_project_to_time_embeddings(image_embeds)``,
  the U-Net's ``class_labels`` (``class_embed_type="identity"``: added to the time embedding);
- ``context = [extra tokens, text_encoder_hidden_states_norm(encoder_hidden_states_proj(text_states))]`` where the
  ``clip_extra_context_tokens`` extra tokens come from ``clip_extra_context_tokens_proj(image_embeds)`` read as
  ``(cross_attention_dim, tokens)`` and transposed (diffusers' layout of that projection).

Classifier-free guidance drops the image embedding for ``learned_classifier_free_guidance_embeddings`` (the
learned null embedding, :meth:`UnCLIPTextProjModel.null_image_embeddings`) and the prompt for the empty one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models.layers import Maker, config_from_dict

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UnCLIPTextProjConfig:
    """Keys of diffusers' ``UnCLIPTextProjModel`` config (``time_embed_dim`` and ``cross_attention_dim`` are
    required there; these defaults are karlo's)."""

    clip_extra_context_tokens: int = 4
    clip_embeddings_dim: int = 768
    time_embed_dim: int = 1536
    cross_attention_dim: int = 1536

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnCLIPTextProjConfig":
        return config_from_dict(cls, d)


class UnCLIPTextProjModel(nnx.Module):
    """``(image_embeds (B, E), text_embeds (B, E), text_states (B, L, E)) -> (context (B, n + L, C), additive (B,
    time_embed_dim))``; prepend ``n`` True entries to the text mask for the decoder (:func:`decoder_mask`)."""

    config_class = UnCLIPTextProjConfig

    def __init__(self, config: UnCLIPTextProjConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = cfg = config
        mk = Maker(rngs, dtype, param_dtype)
        e, c = cfg.clip_embeddings_dim, cfg.cross_attention_dim
        self.learned_classifier_free_guidance_embeddings = nnx.Param(jnp.zeros((e,), param_dtype))
        self.embedding_proj = mk.linear(e, cfg.time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = mk.linear(e, cfg.time_embed_dim)
        self.clip_extra_context_tokens_proj = mk.linear(e, cfg.clip_extra_context_tokens * c)
        self.encoder_hidden_states_proj = mk.linear(e, c)
        self.text_encoder_hidden_states_norm = mk.layer_norm(c, 1e-5)

    def __call__(self, image_embeds: Array, text_embeds: Array, text_states: Array) -> tuple[Array, Array]:
        b = image_embeds.shape[0]
        if text_embeds.shape[0] != b or text_states.shape[0] != b:
            raise ValueError(f"image embeddings ({b}), text embeddings ({text_embeds.shape[0]}) and text states "
                             f"({text_states.shape[0]}) must have the same batch size")
        image_time = self.clip_image_embeddings_project_to_time_embeddings(image_embeds)
        additive = self.embedding_proj(text_embeds) + image_time
        n = self.config.clip_extra_context_tokens
        extra = self.clip_extra_context_tokens_proj(image_embeds).reshape(b, -1, n).transpose(0, 2, 1)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_states))
        return jnp.concatenate([extra, text], axis=1), additive

    def null_image_embeddings(self, batch: int) -> Array:
        """The learned image embedding of the unconditional half of classifier-free guidance, (batch, E)."""
        null = self.learned_classifier_free_guidance_embeddings[...]
        return jnp.broadcast_to(null, (batch, null.shape[0]))

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        return key

    @classmethod
    def from_pretrained_tensors(cls, config: Mapping[str, Any] | UnCLIPTextProjConfig, tensors: Mapping[str, Any],
                                *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> "UnCLIPTextProjModel":
        return build_from_tensors(cls, UnCLIPTextProjConfig, config, tensors, dtype=dtype, param_dtype=param_dtype)


def decoder_mask(text_mask: Array, extra_tokens: int) -> Array:
    """The decoder's context mask: ``extra_tokens`` True entries (the image tokens) before the text mask."""
    m = jnp.asarray(text_mask, bool)
    return jnp.concatenate([jnp.ones((m.shape[0], extra_tokens), bool), m], axis=1)
