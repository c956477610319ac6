"""CLIP text and vision transformers (Radford et al. 2021), compatible with transformers' layout.

The modules mirror ``transformers.CLIPTextModel`` / ``CLIPTextModelWithProjection`` /
``CLIPVisionModelWithProjection`` parameter names (``text_model.encoder.layers.0.self_attn.q_proj``,
``vision_model.pre_layrnorm`` ...), so checkpoints load with :func:`jaxdiff.convert.load_torch_tensors`.
Stable Diffusion 1.x uses OpenAI's ViT-L/14 text tower (last hidden state after the final layer
norm); SD 2.x ships OpenCLIP ViT-H/14 with its last layer already removed; SDXL and "clip skip"
take an earlier hidden state, which :meth:`CLIPTextModel.hidden_state` selects.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.export import torch_state_dict
from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models.attention import attention
from jaxdiff.models.layers import ACTIVATIONS, KeySource, Maker, config_from_dict

Array = jax.Array

IGNORED_TORCH_KEYS = (r"position_ids$",)
# hidden_act values accepted (functions from the shared table, transformers' ACT2FN numerics)
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")


def _check_act(act: str) -> None:
    if act not in HIDDEN_ACTS:
        raise ValueError(f"hidden_act={act!r} is not supported; use one of {list(HIDDEN_ACTS)}.")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Keys of transformers' ``CLIPTextConfig`` (defaults: transformers' defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        _check_act(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a ``config.json`` dict (a full ``CLIPConfig``'s ``text_config`` is used when present)."""
        return config_from_dict(cls, d.get("text_config") or d)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict for transformers' ``CLIPTextModel`` (``model_type`` ``clip_text_model``)."""
        return dict(dataclasses.asdict(self), model_type="clip_text_model")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Keys of transformers' ``CLIPVisionConfig`` (defaults: transformers' defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_act(self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a ``config.json`` dict (a full ``CLIPConfig``'s ``vision_config`` is used when present)."""
        return config_from_dict(cls, d.get("vision_config") or d)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict for transformers' ``CLIPVisionModelWithProjection``."""
        return dict(dataclasses.asdict(self), model_type="clip_vision_model")


def _maker(rngs: nnx.Rngs | KeySource, dtype: Any, param_dtype: Any) -> Maker:
    """Flax-default initialisation; per-layer keys from a Python counter (``nnx.Rngs`` in every layer
    makes ``nnx.eval_shape`` quadratic in the number of layers, see :class:`KeySource`)."""
    return Maker(rngs, dtype, param_dtype, init="flax")


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with ``q/k/v/out_proj`` (scale ``head_dim**-0.5``)."""

    def __init__(self, dim: int, heads: int, mk: Maker):
        self.heads = heads
        self.q_proj = mk.linear(dim, dim)
        self.k_proj = mk.linear(dim, dim)
        self.v_proj = mk.linear(dim, dim)
        self.out_proj = mk.linear(dim, dim)

    def __call__(self, x: Array, mask: Array | None = None, is_causal: bool = False) -> Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, mask=mask, is_causal=is_causal)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, inner: int, act: str, mk: Maker):
        self.act = act
        self.fc1 = mk.linear(dim, inner)
        self.fc2 = mk.linear(inner, dim)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, mk: Maker):
        d = cfg.hidden_size
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, mk)
        self.layer_norm1 = mk.layer_norm(d, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act, mk)
        self.layer_norm2 = mk.layer_norm(d, cfg.layer_norm_eps)

    def __call__(self, x: Array, mask: Array | None = None, is_causal: bool = False) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """A stack of :class:`CLIPEncoderLayer` (``encoder.layers.i``)."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, mk: Maker):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, mk) for _ in range(cfg.num_hidden_layers)])

    def __call__(
        self, x: Array, mask: Array | None = None, is_causal: bool = False, n: int | None = None,
    ) -> list[Array]:
        """Hidden states: the input, then the output of each of the first ``n`` layers (all by default)."""
        states = [x]
        for layer in list(self.layers)[:n]:
            states.append(layer(states[-1], mask, is_causal))
        return states


# ----------------------------------------------------------------------------------------- text


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, cfg: CLIPTextConfig, mk: Maker):
        self.token_embedding = mk.embed(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = mk.embed(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, input_ids: Array) -> Array:
        t = input_ids.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings={self.position_embedding.num_embeddings}; "
                "truncate the tokens (the CLIP tokenizer's max_length)."
            )
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))


class CLIPTextOutput(NamedTuple):
    """``last_hidden_state`` (after ``final_layer_norm``), ``pooler_output`` (the EOS token's row of it),
    ``hidden_states`` (embeddings, then each layer's output, before any final norm) and, for
    :class:`CLIPTextModelWithProjection`, ``text_embeds``."""

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]
    text_embeds: Array | None = None


class CLIPTextTransformer(nnx.Module):
    """``text_model``: embeddings, causal encoder, final layer norm."""

    def __init__(self, cfg: CLIPTextConfig, mk: Maker):
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, mk)
        self.encoder = CLIPEncoder(cfg, mk)
        self.final_layer_norm = mk.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)

    def states(self, input_ids: Array, attention_mask: Array | None = None, n: int | None = None) -> list[Array]:
        """Embeddings and the outputs of the first ``n`` causal layers."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {input_ids.shape}.")
        mask = None
        if attention_mask is not None:  # padding mask on keys, combined with the causal mask
            mask = jnp.asarray(attention_mask, bool)[:, None, None, :]
        return self.encoder(self.embeddings(input_ids), mask, is_causal=True, n=n)

    def pool(self, last_hidden_state: Array, input_ids: Array) -> Array:
        """The EOS token's hidden state, located as transformers does.

        Configs with ``eos_token_id == 2`` (written before transformers PR #24773, e.g. SD 1.x/2.x) take the
        position of the largest token id; others the first position holding ``eos_token_id``.
        Added tokens (textual inversion, :func:`jaxdiff.models.patches.set_embedding_rows`) have ids above
        the EOS id, so with such a legacy config the pooled output is read at the largest *added* token's
        position, not at EOS: transformers does the same (checked in ``tests/models/test_patches.py``).
        The hidden states, which Stable Diffusion's U-Net reads, are unaffected.
        """
        if self.eos_token_id == 2:
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden_state, idx[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        states = self.states(input_ids, attention_mask)
        last = self.final_layer_norm(states[-1])
        return CLIPTextOutput(last, self.pool(last, input_ids), tuple(states))


def _hidden_index(index: int, num_layers: int) -> int:
    """``index`` into hidden states (``-1`` last, ``-2`` penultimate ...) -> number of layers to run."""
    n = index if index >= 0 else num_layers + 1 + index
    if not 0 <= n <= num_layers:
        raise ValueError(f"hidden state index {index} is out of range for {num_layers} layers (+1 embedding output).")
    return n


def _route(key: str, own: tuple[str, ...], other: tuple[str, ...], prefix: str) -> str | None:
    if key.startswith(other) or key == "logit_scale":
        return None  # the other tower of a full CLIPModel checkpoint
    return key if key.startswith(own) else prefix + key


_TEXT_KEYS = ("text_model.", "text_projection.")
_VISION_KEYS = ("vision_model.", "visual_projection.")


class CLIPTextModel(nnx.Module):
    """Compatible with ``transformers.CLIPTextModel`` (checkpoint names ``text_model.*``)."""

    config_class = CLIPTextConfig

    def __init__(
        self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        self.config = config
        self.text_model = CLIPTextTransformer(config, _maker(rngs, dtype, param_dtype))

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        """All outputs of transformers' ``CLIPTextModel`` (with ``output_hidden_states=True``)."""
        return self.text_model(input_ids, attention_mask)

    def hidden_state(
        self, input_ids: Array, index: int = -1, final_layer_norm: bool = True, attention_mask: Array | None = None
    ) -> Array:
        """``hidden_states[index]``, optionally through ``final_layer_norm``; runs only the layers needed.

        SD 1.x: ``index=-1`` with the norm (= ``last_hidden_state``); "clip skip" k: ``index=-(k+1)`` with
        the norm (diffusers' ``clip_skip``); SDXL: ``index=-2`` without it.
        """
        n = _hidden_index(index, self.config.num_hidden_layers)
        h = self.text_model.states(input_ids, attention_mask, n=n)[-1]
        return self.text_model.final_layer_norm(h) if final_layer_norm else h

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        """transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; older files have it."""
        if key.startswith("text_projection."):
            return None
        return _route(key, _TEXT_KEYS, _VISION_KEYS, "text_model.")

    @classmethod
    def from_pretrained_tensors(
        cls, config: Mapping[str, Any] | Any, tensors: Mapping[str, Any],
        *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        """Build abstractly from a ``config.json`` dict (or config) and fill from torch-named ``tensors``."""
        return _from_tensors(cls, config, tensors, dtype, param_dtype)


class CLIPTextModelWithProjection(CLIPTextModel):
    """Compatible with ``transformers.CLIPTextModelWithProjection`` (adds ``text_projection``, no bias)."""

    def __init__(
        self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        mk = _maker(rngs, dtype, param_dtype)
        super().__init__(config, rngs=mk.keys, dtype=dtype, param_dtype=param_dtype)
        self.text_projection = mk.linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        return _route(key, _TEXT_KEYS, _VISION_KEYS, "text_model.")


# --------------------------------------------------------------------------------------- vision


class CLIPVisionEmbeddings(nnx.Module):
    """Class token + non-overlapping patches (conv without bias) + learned positions."""

    def __init__(self, cfg: CLIPVisionConfig, mk: Maker):
        d, p = cfg.hidden_size, cfg.patch_size
        self.image_size = cfg.image_size
        self.class_embedding = nnx.Param(jax.random.normal(mk.keys.params(), (d,), mk.param_dtype))
        self.patch_embedding = mk.conv(cfg.num_channels, d, p, stride=p, padding="VALID", bias=False)
        self.position_embedding = mk.embed((cfg.image_size // p) ** 2 + 1, d)

    def __call__(self, pixels: Array) -> Array:
        b, h, w, _ = pixels.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} (NHWC), got {h}x{w}; resize first.")
        patches = self.patch_embedding(pixels)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        pos = self.position_embedding(jnp.arange(self.position_embedding.num_embeddings))
        return jnp.concatenate([cls, patches], axis=1) + pos


class CLIPVisionOutput(NamedTuple):
    """``image_embeds`` (projected, post-layernormed class token), ``last_hidden_state`` (no final norm),
    ``pooler_output`` (post-layernormed class token) and ``hidden_states`` (after ``pre_layrnorm``, then each layer)."""

    image_embeds: Array | None
    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]


class CLIPVisionTransformer(nnx.Module):
    """``vision_model``: embeddings, ``pre_layrnorm`` (sic), encoder, ``post_layernorm`` on the class token."""

    def __init__(self, cfg: CLIPVisionConfig, mk: Maker):
        self.embeddings = CLIPVisionEmbeddings(cfg, mk)
        self.pre_layrnorm = mk.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, mk)
        self.post_layernorm = mk.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, pixels: Array) -> CLIPVisionOutput:
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        pooled = self.post_layernorm(states[-1][:, 0])
        return CLIPVisionOutput(None, states[-1], pooled, tuple(states))


class CLIPVisionModelWithProjection(nnx.Module):
    """Compatible with ``transformers.CLIPVisionModelWithProjection``; input: normalised NHWC pixels."""

    config_class = CLIPVisionConfig

    def __init__(
        self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        self.config = config
        mk = _maker(rngs, dtype, param_dtype)
        self.vision_model = CLIPVisionTransformer(config, mk)
        self.visual_projection = mk.linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, pixel_values: Array) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values)
        return out._replace(image_embeds=self.visual_projection(out.pooler_output))

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        return _route(key, _VISION_KEYS, _TEXT_KEYS, "vision_model.")

    @classmethod
    def from_pretrained_tensors(
        cls, config: Mapping[str, Any] | Any, tensors: Mapping[str, Any],
        *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        """Build abstractly from a ``config.json`` dict (or config) and fill from torch-named ``tensors``."""
        return _from_tensors(cls, config, tensors, dtype, param_dtype)


def _from_tensors(cls: type, config: Any, tensors: Mapping[str, Any], dtype: Any, param_dtype: Any) -> Any:
    return build_from_tensors(cls, cls.config_class, config, tensors, rename=cls.rename_torch_key,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)


# ----------------------------------------------------------------------------------- both towers


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Keys of transformers' ``CLIPConfig``: the two towers' configs, ``projection_dim`` (the shared embedding
    width; the towers' own ``projection_dim`` keys are unused here, as in transformers) and the initial
    ``logit_scale`` (``log(1 / 0.07)``, Radford et al. 2021, section 2.5)."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """From a transformers ``CLIPModel`` ``config.json`` dict (``text_config`` and ``vision_config`` nested)."""
        if "text_config" not in d or "vision_config" not in d:
            raise ValueError("a CLIPModel config.json needs both 'text_config' and 'vision_config'; "
                             "load a single tower with CLIPTextModel / CLIPVisionModelWithProjection instead.")
        top = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if k in d}
        return cls(CLIPTextConfig.from_dict(d["text_config"]), CLIPVisionConfig.from_dict(d["vision_config"]), **top)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``CLIPConfig`` reads back to this configuration."""
        return {"model_type": "clip", "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value, "text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict()}


class CLIPOutput(NamedTuple):
    """As transformers' ``CLIPOutput`` (without the loss; see :mod:`jaxdiff.train.contrastive`):
    ``logits_per_image`` (images x texts) = ``exp(logit_scale) * image_embeds @ text_embeds.T``,
    ``logits_per_text`` its transpose, the L2-normalised ``text_embeds`` / ``image_embeds``, each tower's own
    output (its ``pooler_output`` before projection), and the raw (log) ``logit_scale`` parameter, which the
    training loss clips."""

    logits_per_image: Array
    logits_per_text: Array
    text_embeds: Array
    image_embeds: Array
    text_model_output: CLIPTextOutput
    vision_model_output: CLIPVisionOutput
    logit_scale: Array


def l2_normalize(x: Array) -> Array:
    """``x / ||x||_2`` over the last axis (transformers' ``_get_vector_norm``, no epsilon)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nnx.Module):
    """Compatible with ``transformers.CLIPModel``: ``text_model``, ``vision_model``, ``text_projection`` and
    ``visual_projection`` (no bias) and the scalar ``logit_scale``. Images are normalised NHWC pixels."""

    config_class = CLIPConfig

    def __init__(
        self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        self.config = config
        mk = _maker(rngs, dtype, param_dtype)
        text, vision = config.text_config, config.vision_config
        self.text_model = CLIPTextTransformer(text, mk)
        self.vision_model = CLIPVisionTransformer(vision, mk)
        self.visual_projection = mk.linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = mk.linear(text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Projected pooled text features, not normalised (transformers' ``get_text_features().pooler_output``)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: Array) -> Array:
        """Projected pooled image features, not normalised (transformers' ``get_image_features().pooler_output``)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None) -> CLIPOutput:
        """Cosine similarities scaled by ``exp(logit_scale)`` (unclipped, as transformers' forward)."""
        text_out = self.text_model(input_ids, attention_mask)
        vision_out = self.vision_model(pixel_values)
        text_embeds = l2_normalize(self.text_projection(text_out.pooler_output))
        image_embeds = l2_normalize(self.visual_projection(vision_out.pooler_output))
        scale = self.logit_scale[...]
        logits_per_text = jnp.exp(scale).astype(text_embeds.dtype) * (text_embeds @ image_embeds.T)
        return CLIPOutput(logits_per_text.T, logits_per_text, text_embeds, image_embeds, text_out, vision_out, scale)

    def text_tower(self, projection: bool = False) -> "CLIPTextModel":
        """The text tower alone, as a :class:`CLIPTextModel` (Stable Diffusion's ``text_encoder``) or, with
        ``projection``, a :class:`CLIPTextModelWithProjection`; it holds copies of this model's arrays."""
        return self._tower(CLIPTextModelWithProjection if projection else CLIPTextModel, self.config.text_config,
                           ("text_model.", "text_projection.") if projection else ("text_model.",))

    def vision_tower(self) -> "CLIPVisionModelWithProjection":
        """The image tower with its projection, as a :class:`CLIPVisionModelWithProjection` (copied arrays)."""
        return self._tower(CLIPVisionModelWithProjection, self.config.vision_config,
                           ("vision_model.", "visual_projection."))

    def _tower(self, cls: type, cfg: Any, prefixes: tuple[str, ...]) -> Any:
        tensors = {k: v for k, v in torch_state_dict(self).items() if k.startswith(prefixes)}
        cfg = dataclasses.replace(cfg, projection_dim=self.config.projection_dim)
        dtype = self.text_projection.kernel[...].dtype
        return cls.from_pretrained_tensors(cfg, tensors, dtype=self.text_projection.dtype, param_dtype=dtype)

    @staticmethod
    def rename_torch_key(key: str) -> str | None:
        """Names are transformers' own (``text_model.*``, ``vision_model.*``, ``logit_scale`` ...)."""
        return key

    @classmethod
    def from_pretrained_tensors(
        cls, config: Mapping[str, Any] | Any, tensors: Mapping[str, Any],
        *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        """Build abstractly from a ``config.json`` dict (or :class:`CLIPConfig`), fill from torch-named ``tensors``."""
        return _from_tensors(cls, config, tensors, dtype, param_dtype)
