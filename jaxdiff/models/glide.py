"""GLIDE (Nichol et al. 2022, "GLIDE: Towards Photorealistic Image Generation and Editing with Text-Guided
Diffusion Models"): the text-conditional pixel U-Net with its own transformer text encoder.

The network is the ADM U-Net (Dhariwal & Nichol 2021: scale-shift norm, residual up/down-sampling,
64-channel heads) whose attention layers also attend to the text (Sec. 2.3 and App. A of the paper):

- the **text encoder** (``text_encoder``, named as openai/glide-text2im's ``Text2ImUNet``): token plus
  positional embeddings; where the mask is 0 (padding) the learned ``padding_embedding`` replaces them
  (``xf_padding``); ``xf_layers`` pre-norm residual blocks with a fused, per-head ``[q, k, v]``
  projection ``c_qkv`` and no causal mask; a final layer norm (``xf_final_ln``);
- its **last token** projected by ``transformer_proj`` to the time-embedding width and *added to the
  time embedding* (diffusers' ``class_embed_type="identity"`` of the U-Net);
- all token states projected in each attention layer to extra keys and values (openai's ``encoder_kv``,
  diffusers' ``add_k_proj`` / ``add_v_proj``) concatenated before the image's own
  (``SimpleCrossAttnDownBlock2D`` ... of diffusers' unCLIP decoder, which inherits GLIDE's layout).

The U-Net is jaxdiff's :class:`~jaxdiff.models.unet.UNet2DConditionModel` with the config of
:meth:`GlideConfig.unet_config`; :mod:`jaxdiff.convert.glide` renames openai's checkpoint keys. The
output has ``2 * 3`` channels: the noise estimate and the variance interpolation (``learned_sigma``,
Nichol & Dhariwal 2021, eq. 15). The 64 -> 256 upsampler (``super_res``) takes the bilinearly upsampled
low-resolution image as 3 extra input channels.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.torch_layout import shapes_only
from jaxdiff.models.attention import attention
from jaxdiff.models.layers import KeySource, Maker, config_from_dict

Array = jax.Array

GLIDE_VOCAB = 50257   # the GPT-2 byte-pair encoder of glide_text2im.tokenizer (end token 50256 pads)
LN_EPS = 1e-5         # torch.nn.LayerNorm's default, as in glide_text2im.xf


@dataclasses.dataclass(frozen=True)
class GlideConfig:
    """openai/glide-text2im's ``create_model`` options; defaults are ``model_and_diffusion_defaults()``
    (the released 64x64 base model). :meth:`upsampler` gives ``model_and_diffusion_defaults_upsampler()``.

    ``channel_mult`` empty picks openai's per-size default; ``attention_resolutions`` are image sizes at
    which the U-Net attends (``"32,16,8"``). ``n_vocab`` is the tokenizer's vocabulary size.
    """

    image_size: int = 64
    num_channels: int = 192
    num_res_blocks: int = 3
    channel_mult: tuple[int, ...] = ()
    num_head_channels: int = 64
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    n_vocab: int = GLIDE_VOCAB
    super_res: bool = False
    norm_num_groups: int = 32

    @classmethod
    def upsampler(cls, **overrides: Any) -> "GlideConfig":
        """The released 64 -> 256 upsampler: 256 px, two residual blocks per level, ``super_res``."""
        return cls(**{**dict(image_size=256, num_res_blocks=2, super_res=True), **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GlideConfig":
        d = dict(d)
        for key in ("channel_mult", "attention_resolutions"):
            if isinstance(d.get(key), str):  # openai's comma-separated strings
                d[key] = tuple(int(v) for v in d[key].split(",") if v)
        return config_from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def mult(self) -> tuple[int, ...]:
        """openai's channel multipliers (its defaults for 64, 128 and 256 px when ``channel_mult`` is empty)."""
        if self.channel_mult:
            return tuple(self.channel_mult)
        defaults = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}
        if self.image_size not in defaults:
            raise ValueError(f"no default channel_mult for image_size {self.image_size}; give channel_mult "
                             "(one multiplier per level, e.g. (1, 2))")
        return defaults[self.image_size]

    @property
    def in_channels(self) -> int:
        return 6 if self.super_res else 3

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.num_channels

    def attends(self) -> tuple[bool, ...]:
        """Per level: whether its blocks attend (``image_size / 2**level`` in ``attention_resolutions``)."""
        return tuple(self.image_size // 2**level in self.attention_resolutions for level in range(len(self.mult)))

    def unet_config(self) -> dict[str, Any]:
        """The diffusers ``UNet2DConditionModel`` config.json of GLIDE's U-Net (the unCLIP decoder's blocks)."""
        att = self.attends()
        down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in att]
        up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(att)]
        return dict(
            sample_size=self.image_size, in_channels=self.in_channels, out_channels=6,
            down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=[self.num_channels * m for m in self.mult], layers_per_block=self.num_res_blocks,
            cross_attention_dim=self.xf_width, attention_head_dim=self.num_head_channels,
            resnet_time_scale_shift="scale_shift", class_embed_type="identity", norm_num_groups=self.norm_num_groups,
            norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
        )


# ---- the text encoder ------------------------------------------------------------------------

class QKVSelfAttention(nnx.Module):
    """Self-attention with one fused projection ``c_qkv`` whose outputs are laid out per head as
    ``[q_h, k_h, v_h]`` (openai's ``QKVMultiheadAttention``), scale ``1/sqrt(head_dim)``, no mask."""

    def __init__(self, width: int, heads: int, mk: Maker):
        if width % heads:
            raise ValueError(f"xf_width {width} is not divisible by xf_heads {heads}")
        self.heads = heads
        self.c_qkv = mk.linear(width, 3 * width)
        self.c_proj = mk.linear(width, width)

    def __call__(self, x: Array) -> Array:
        b, n, w = x.shape
        qkv = self.c_qkv(x).reshape(b, n, self.heads, 3 * (w // self.heads))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        return self.c_proj(attention(q, k, v).reshape(b, n, w))


class MLP(nnx.Module):
    """``c_proj(gelu(c_fc(x)))`` with the exact (erf) GELU and a 4x hidden width."""

    def __init__(self, width: int, mk: Maker):
        self.c_fc = mk.linear(width, 4 * width)
        self.c_proj = mk.linear(4 * width, width)

    def __call__(self, x: Array) -> Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class ResidualAttentionBlock(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mk: Maker):
        self.attn = QKVSelfAttention(width, heads, mk)
        self.ln_1 = mk.layer_norm(width, LN_EPS)
        self.mlp = MLP(width, mk)
        self.ln_2 = mk.layer_norm(width, LN_EPS)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    """``resblocks``: the stack of :class:`ResidualAttentionBlock`."""

    def __init__(self, width: int, layers: int, heads: int, mk: Maker):
        self.resblocks = nnx.List([ResidualAttentionBlock(width, heads, mk) for _ in range(layers)])

    def __call__(self, x: Array) -> Array:
        for block in self.resblocks:
            x = block(x)
        return x


class TextOutput(NamedTuple):
    """``proj``: ``transformer_proj`` of the last token, (B, time_embed_dim), added to the time embedding;
    ``states``: the token states (B, text_ctx, xf_width) every attention layer reads as extra keys/values."""

    proj: Array
    states: Array


class GlideTextEncoder(nnx.Module):
    """GLIDE's text transformer; parameter names as in openai's ``Text2ImUNet`` (``token_embedding``,
    ``positional_embedding``, ``padding_embedding``, ``transformer.resblocks.N``, ``final_ln``,
    ``transformer_proj``)."""

    def __init__(self, cfg: GlideConfig, mk: Maker):
        self.config = cfg
        w, n = cfg.xf_width, cfg.text_ctx
        self.token_embedding = mk.embed(cfg.n_vocab, w)
        self.positional_embedding = nnx.Param(_normal(mk, (n, w), 0.01))
        self.padding_embedding = nnx.Param(_normal(mk, (n, w), 0.01)) if cfg.xf_padding else None
        self.transformer = Transformer(w, cfg.xf_layers, cfg.xf_heads, mk)
        self.final_ln = mk.layer_norm(w, LN_EPS) if cfg.xf_final_ln else None
        self.transformer_proj = mk.linear(w, cfg.time_embed_dim)
        self.dtype = mk.dtype

    def __call__(self, tokens: Array, mask: Array | None = None) -> TextOutput:
        """``tokens`` (B, text_ctx) integers; ``mask`` (B, text_ctx), True/1 on real tokens (needed with
        ``xf_padding``)."""
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != cfg.text_ctx:
            raise ValueError(f"tokens must be (batch, text_ctx) = (B, {cfg.text_ctx}), got shape {tokens.shape}; "
                             "pad with the tokenizer's end token and pass the mask")
        x = self.token_embedding(tokens.astype(jnp.int32)) + self.positional_embedding[None].astype(self.dtype)
        if self.padding_embedding is not None:
            if mask is None:
                raise ValueError("this text encoder replaces padding by padding_embedding (xf_padding): pass the "
                                 "mask (B, text_ctx), True on real tokens")
            keep = jnp.asarray(mask).astype(bool)[..., None]
            x = jnp.where(keep, x, self.padding_embedding[None].astype(self.dtype))
        x = self.transformer(x.astype(self.dtype))
        if self.final_ln is not None:
            x = self.final_ln(x)
        return TextOutput(self.transformer_proj(x[:, -1]), x)


def _normal(mk: Maker, shape: tuple[int, ...], std: float) -> Array:
    """A ``N(0, std^2)`` parameter table drawn from the maker's key stream (zeros when only shapes are built)."""
    if shapes_only():
        return jnp.zeros(shape, mk.param_dtype)
    return std * jax.random.normal(mk.keys.params(), shape, mk.param_dtype)


# ---- the whole network -----------------------------------------------------------------------

class GlideUNet(nnx.Module):
    """GLIDE: ``text_encoder`` (:class:`GlideTextEncoder`) and ``unet`` (jaxdiff's diffusers-layout
    ``UNet2DConditionModel`` with added-KV attention, scale-shift resnets and an identity class embedding).

    ``__call__(x, t, cond)`` is a network in jaxdiff's ``net(x, t, cond)`` convention (NHWC, the VP
    ``x_t`` and the training step t) returning ``(B, H, W, 6)``: noise estimate and variance values.
    ``cond`` is a dict with ``tokens`` and ``mask`` (the encoder runs in the call), or with the
    encoder's outputs ``text_proj`` and ``text_states`` (see :meth:`encode`: run it once per prompt).
    For the upsampler ``x`` carries the upsampled low-resolution image as channels 3-5.
    """

    def __init__(self, config: GlideConfig, *, rngs: nnx.Rngs | KeySource, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel

        self.config = config
        mk = Maker(rngs, dtype, param_dtype)
        self.text_encoder = GlideTextEncoder(config, mk)
        self.unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config.unet_config()), rngs=mk.keys,
                                         dtype=dtype, param_dtype=param_dtype)

    def encode(self, tokens: Array, mask: Array | None = None) -> dict[str, Array]:
        """The conditioning dict ``{"text_proj", "text_states"}`` for ``tokens`` / ``mask``."""
        out = self.text_encoder(tokens, mask)
        return {"text_proj": out.proj, "text_states": out.states}

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Array]) -> Array:
        if not isinstance(cond, Mapping):
            raise TypeError("GLIDE's conditioning is a dict with 'tokens' and 'mask', or with 'text_proj' and "
                            f"'text_states' (GlideUNet.encode), got {type(cond).__name__}")
        if "text_states" not in cond:
            if "tokens" not in cond:
                raise ValueError(f"GLIDE's conditioning needs 'tokens' (and 'mask') or 'text_proj' and "
                                 f"'text_states'; got keys {sorted(cond)}")
            cond = {**cond, **self.encode(cond["tokens"], cond.get("mask"))}
        return self.unet(x, t, cond["text_states"], class_labels=cond["text_proj"])
