"""The image half of unCLIP's decoder conditioning (Ramesh et al. 2022, sec. 2.1; diffusers' ``UnCLIPTextProjModel``).

unCLIP's decoder reads a CLIP image embedding twice: projected and *added to the time embedding*, and projected
to ``clip_extra_context_tokens`` extra tokens of the cross-attention context. Classifier-free guidance replaces
the embedding by a learned vector (``learned_classifier_free_guidance_embeddings``, zero at initialisation).
This module keeps exactly those parameters, under diffusers' names and PyTorch layouts, and leaves out the text
half of ``UnCLIPTextProjModel`` (``embedding_proj``, ``encoder_hidden_states_proj``,
``text_encoder_hidden_states_norm``): the digits decoder of :mod:`jaxdiff.pipelines.unclip_digits` is conditioned
on the image embedding alone, so image variations need no caption. The U-Net takes the additive embedding through
``class_embed_type="identity"``, as the diffusers unCLIP decoder does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.layers import Maker

Array = jax.Array


@dataclass(frozen=True)
class UnCLIPImageProjConfig:
    """``clip_embeddings_dim``: the CLIP projection width; ``time_embed_dim``: the U-Net's time embedding width
    (4 x its first block's channels); ``cross_attention_dim``: its context width; ``clip_extra_context_tokens``: how
    many context tokens the embedding becomes (diffusers' default 4)."""

    clip_embeddings_dim: int
    time_embed_dim: int
    cross_attention_dim: int
    clip_extra_context_tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("clip_embeddings_dim", "time_embed_dim", "cross_attention_dim", "clip_extra_context_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UnCLIPImageProjConfig.{name} must be a positive integer, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnCLIPImageProjConfig":
        return cls(**{k: int(d[k]) for k in ("clip_embeddings_dim", "time_embed_dim", "cross_attention_dim",
                                             "clip_extra_context_tokens") if k in d})


class UnCLIPImageProj(nnx.Module):
    """``(image_embeddings (B, d)) -> (context tokens (B, T, cross_attention_dim), time addition (B, time_dim))``."""

    def __init__(self, config: UnCLIPImageProjConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        mk = Maker(rngs, dtype, param_dtype)
        d = config.clip_embeddings_dim
        self.learned_classifier_free_guidance_embeddings = nnx.Param(jnp.zeros((d,), param_dtype))
        self.clip_image_embeddings_project_to_time_embeddings = mk.linear(d, config.time_embed_dim)
        self.clip_extra_context_tokens_proj = mk.linear(d, config.clip_extra_context_tokens * config.cross_attention_dim)
        self.dtype = dtype

    def null_embedding(self, batch: int) -> Array:
        """The learned unconditional embedding, repeated ``batch`` times (the guidance's unconditional input)."""
        e = jnp.asarray(self.learned_classifier_free_guidance_embeddings[...], self.dtype)
        return jnp.broadcast_to(e, (batch, e.shape[0]))

    def __call__(self, image_embeddings: Array) -> tuple[Array, Array]:
        cfg = self.config
        if image_embeddings.ndim != 2 or image_embeddings.shape[-1] != cfg.clip_embeddings_dim:
            raise ValueError(f"image_embeddings must be (batch, {cfg.clip_embeddings_dim}), got "
                             f"{tuple(image_embeddings.shape)}")
        e = image_embeddings.astype(self.dtype)
        time = self.clip_image_embeddings_project_to_time_embeddings(e)
        # diffusers: reshape(B, -1, T).permute(0, 2, 1): the flat projection is laid out (D, T), token-minor.
        tokens = self.clip_extra_context_tokens_proj(e).reshape(e.shape[0], cfg.cross_attention_dim, -1)
        return jnp.swapaxes(tokens, 1, 2), time


def select_embeddings(proj: UnCLIPImageProj, image_embeddings: Array, keep: Array) -> Array:
    """Classifier-free dropout (Ho & Salimans 2022, as unCLIP trains its decoder): rows where ``keep`` is False
    become the learned unconditional embedding."""
    null = proj.null_embedding(image_embeddings.shape[0])
    return jnp.where(jnp.asarray(keep, bool)[:, None], image_embeddings.astype(null.dtype), null)
