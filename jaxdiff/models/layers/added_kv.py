"""Attention with added key/value projections of the text (diffusers ``Attention`` with ``added_kv_proj_dim``
and ``AttnAddedKVProcessor``): the self-and-cross attention of GLIDE / unCLIP / DeepFloyd IF U-Nets.

Nichol et al. 2022 ("GLIDE"): the text tokens, projected separately to every attention layer's width, are
concatenated with the image's own keys and values, so one softmax attends over both. Ramesh et al. 2022
(unCLIP) and DeepFloyd IF keep that block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.attention import attention
from jaxdiff.models.attention_control import ControlRun, Site
from jaxdiff.models.layers.make import Identity, Maker

Array = jax.Array

CROSS_ATTENTION_NORMS = (None, "layer_norm", "group_norm")
# diffusers turns a 0/1 attention mask into this additive logit bias (UNet2DConditionModel.forward).
MASK_BIAS = -10000.0


def mask_bias(mask: Array | None) -> Array | None:
    """(B, L) keep-mask (1/True: attend) -> (B, L) float32 logit bias ``(1 - mask) * -10000`` (diffusers)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, text tokens), got shape {mask.shape}")
    return (1.0 - mask.astype(jnp.float32)) * MASK_BIAS


class AddedKVAttention(nnx.Module):
    """``softmax(q [k_text; k_self]^T / sqrt(d)) [v_text; v_self]`` on NHWC input, plus the input.

    ``q``, ``k_self``, ``v_self`` come from the group-normed pixels (``to_q`` / ``to_k`` / ``to_v``); ``k_text``,
    ``v_text`` from the text states (``add_k_proj`` / ``add_v_proj``), first normalised by ``norm_cross``
    (``cross_attention_norm``: a GroupNorm over the text channels, or a LayerNorm). ``only_cross_attention``
    drops the self keys. Without text the pixels (before the group norm) stand in, as in diffusers.
    The kernel is :func:`jaxdiff.models.attention.attention` (``attention_backend``: this layer's backend).

    Attention control (``site``, kind ``"cross"``): keys are the ``L`` text tokens followed by the ``h * w``
    pixels (text only with ``only_cross_attention``), so records and edits see ``(B, heads, h*w, L + h*w)``
    maps; a :class:`~jaxdiff.models.attention_control.Hypernetwork` transforms the text that ``add_k_proj`` /
    ``add_v_proj`` read.
    """

    def __init__(self, channels: int, mk: Maker, *, heads: int, dim_head: int, added_kv_dim: int, groups: int,
                 eps: float = 1e-5, only_cross_attention: bool = False, cross_attention_norm: str | None = None,
                 cross_attention_norm_groups: int = 32, attention_backend: str | None = None):
        if cross_attention_norm not in CROSS_ATTENTION_NORMS:
            raise ValueError(f"unsupported cross_attention_norm {cross_attention_norm!r}; use one of "
                             f"{CROSS_ATTENTION_NORMS}")
        if heads < 1:
            raise ValueError(f"attention_head_dim {dim_head} gives no head on a {channels}-channel block; "
                             "fix attention_head_dim")
        inner = heads * dim_head
        self.heads = heads
        self.only_cross_attention = only_cross_attention
        self.attention_backend = attention_backend
        self.site = Site("", "cross", heads)
        self.group_norm = mk.group_norm(channels, groups, eps)
        if cross_attention_norm == "layer_norm":  # diffusers sizes it by the query width (cross_attention_dim)
            self.norm_cross = mk.layer_norm(channels, 1e-5)
        elif cross_attention_norm == "group_norm":
            self.norm_cross = mk.group_norm(added_kv_dim, cross_attention_norm_groups, 1e-5)
        else:
            self.norm_cross = None
        self.to_q = mk.linear(channels, inner)
        self.to_k = None if only_cross_attention else mk.linear(channels, inner)
        self.to_v = None if only_cross_attention else mk.linear(channels, inner)
        self.add_k_proj = mk.linear(added_kv_dim, inner)
        self.add_v_proj = mk.linear(added_kv_dim, inner)
        self.to_out = nnx.List([mk.linear(inner, channels), Identity()])

    def __call__(self, x: Array, context: Array | None = None, control: ControlRun | None = None,
                 text_bias: Array | None = None) -> Array:
        """``x`` (B, h, w, C), ``context`` (B, L, added_kv_dim); ``text_bias`` (B, L) is added to the text keys'
        logits (:func:`mask_bias` of an attention mask)."""
        b, h, w, c = x.shape
        hw = (h, w)
        flat = x.reshape(b, h * w, c)
        if context is None:
            context = flat
        elif self.norm_cross is not None:
            context = self.norm_cross(context)
        hs = self.group_norm(flat)
        ck = cv = context
        if control is not None:
            ck, cv = control.context(self.site, hw, context)
        q, k, v = self.to_q(hs), self.add_k_proj(ck), self.add_v_proj(cv)
        if not self.only_cross_attention:
            k = jnp.concatenate([k, self.to_k(hs)], axis=1)
            v = jnp.concatenate([v, self.to_v(hs)], axis=1)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, t.shape[-1] // self.heads)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        bias = None
        if text_bias is not None:
            if text_bias.shape != (b, ck.shape[1]):
                raise ValueError(f"attention mask of shape {text_bias.shape} does not match the text "
                                 f"(batch {b}, {ck.shape[1]} tokens)")
            pad = k.shape[1] - text_bias.shape[1]  # the pixels' own keys are never masked
            bias = jnp.pad(text_bias, ((0, 0), (0, pad)))[:, None, None, :]
        if control is not None and control.explicit(self.site, hw):
            try:
                out = control.attend(self.site, hw, q, k, v, bias=bias)
            except (TypeError, ValueError) as e:
                raise ValueError(f"attention control at added-KV site {self.site.path!r}: its keys are the "
                                 f"{ck.shape[1]} text tokens followed by the {k.shape[1] - ck.shape[1]} pixels, so the "
                                 f"maps are (B, heads, {h * w}, {k.shape[1]}); size the control's edits to that, or "
                                 f"select other sites ({e})") from e
        else:
            out = attention(q, k, v, backend=self.attention_backend, bias=bias)
        out = self.to_out[0](out.reshape(b, h * w, -1))
        return out.reshape(b, h, w, c) + x
