"""Conditional U-Net of latent diffusion (Stable Diffusion 1.x / 2.x) and of the pixel cascades
(DeepFloyd IF, unCLIP's decoder), NHWC.

Architecture-compatible with diffusers' ``UNet2DConditionModel`` (Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models"): a DDPM U-Net whose stages interleave
residual blocks with spatial transformers that cross-attend to text embeddings. The GLIDE-style
variant (Nichol et al. 2022; Ramesh et al. 2022, unCLIP; DeepFloyd IF) is built from the same
config keys: BigGAN-style resampling residual blocks (``ResnetDownsampleBlock2D`` /
``ResnetUpsampleBlock2D``), attention whose keys and values are the text's and the pixels' own
(``SimpleCrossAttn*`` blocks, :class:`~jaxdiff.models.layers.AddedKVAttention`), the pooled text
added to the time embedding (``addition_embed_type="text"``), a projection of the text states
(``encoder_hid_dim``) and the noise level of a super-resolution stage's low-resolution input as a
second timestep (``class_embed_type="timestep"``). Parameter names mirror diffusers, so its
checkpoints load with :func:`from_pretrained_tensors`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.conditioning import Residuals
from jaxdiff.convert.torch_layout import build_from_tensors
from jaxdiff.models import attention_control
from jaxdiff.models.layers import (
    AddedKVAttention,
    DownBlock,
    Downsample2D,
    Maker,
    MidBlock,
    ResnetBlock2D,
    TextTimeEmbedding,
    TimestepEmbedding,
    Transformer2DModel,
    UpBlock,
    Upsample2D,
    activation,
    batch_timesteps,
    check_block_types,
    config_from_dict,
    mask_bias,
    per_block,
    timestep_embedding,
)

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", None)
_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")
_SIMPLE_CROSS = ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn")
_RESAMPLING = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "ResnetUpsampleBlock2D",
               "SimpleCrossAttnUpBlock2D")


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """The ``config.json`` keys of diffusers' ``UNet2DConditionModel`` that jaxdiff supports.

    As in diffusers, ``attention_head_dim`` is (for historical reasons) the number of heads per
    block of the Stable Diffusion blocks (``CrossAttn*``) unless ``num_attention_heads`` is given;
    each head is ``channels // heads`` wide, so heads that do not divide a block's channels give a
    narrower attention (as in diffusers). In the ``SimpleCrossAttn*`` blocks (IF, unCLIP) it is what
    its name says, the width of one head: ``channels // attention_head_dim`` heads (``None``: one head);
    up block ``i`` reads entry ``i`` of a per-block list, not the reversed one, as diffusers does.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # Present in configs; only the values that Stable Diffusion 1/2 use are supported.
    addition_embed_type: str | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    time_cond_proj_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    dual_cross_attention: bool = False
    class_embeddings_concat: bool = False
    attention_type: str = "default"
    # GLIDE-style blocks (DeepFloyd IF, unCLIP).
    addition_embed_type_num_heads: int = 64
    cross_attention_norm: str | None = None
    mid_block_only_cross_attention: bool | None = None
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet2DConditionConfig":
        cfg = config_from_dict(cls, dict(d))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise a ValueError naming any unsupported or inconsistent setting."""
        self.validate_encoder()
        check_block_types(self, "up_block_types", _UP_TYPES, "jaxdiff's UNet2DConditionModel")

    def validate_encoder(self) -> None:
        """The checks shared with ControlNet (everything but the up blocks)."""
        check_block_types(self, "down_block_types", _DOWN_TYPES, "jaxdiff's UNet2DConditionModel")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; use one of {_MID_TYPES}")
        if self.class_embed_type not in _CLASS_EMBED_TYPES:
            raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r}; supported: {_CLASS_EMBED_TYPES}")
        if self.time_embedding_type != "positional":
            raise ValueError("only time_embedding_type='positional' is supported")
        if self.addition_embed_type not in (None, "text"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported (SDXL / Kandinsky "
                             "features); use null or 'text' (DeepFloyd IF)")
        if self.encoder_hid_dim_type not in (None, "text_proj"):
            raise ValueError(f"encoder_hid_dim_type={self.encoder_hid_dim_type!r} is not supported (Kandinsky / "
                             "IP-Adapter features); use null or 'text_proj'")
        if self.encoder_hid_dim_type is not None and self.encoder_hid_dim is None:
            raise ValueError(f"encoder_hid_dim_type={self.encoder_hid_dim_type!r} needs encoder_hid_dim")
        if self.encoder_hid_dim is not None and not isinstance(self.cross_attention_dim, int):
            raise ValueError("encoder_hid_dim projects the text to one cross_attention_dim: it must be an int")
        if self.addition_embed_type == "text" and self.encoder_hid_dim is None and not isinstance(
                self.cross_attention_dim, int):
            raise ValueError("addition_embed_type='text' pools text of width cross_attention_dim: it must be an int")
        if self.time_embedding_act_fn is not None:
            activation(self.time_embedding_act_fn)  # raises naming the supported ones
        if self.cross_attention_norm not in (None, "layer_norm", "group_norm"):
            raise ValueError(f"unsupported cross_attention_norm {self.cross_attention_norm!r}; "
                             "use null, 'layer_norm' or 'group_norm'")
        unsupported = {"time_cond_proj_dim": self.time_cond_proj_dim, "timestep_post_act": self.timestep_post_act}
        for key, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{key}={value!r} is not supported (LCM / timestep post-activation); it must be null")
        if self.dual_cross_attention or self.class_embeddings_concat or self.attention_type != "default":
            raise ValueError("dual_cross_attention, class_embeddings_concat and gated attention are not supported")
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim is None:
            raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim")

    def check_stable_diffusion_encoder(self, model: str) -> None:
        """Raise a ValueError naming any encoder feature beyond Stable Diffusion's (the GLIDE-style blocks
        and embeddings of IF / unCLIP), for side networks that copy the encoder but are only built for those."""
        extra = [t for t in (*self.down_block_types, self.mid_block_type) if t in (*_SIMPLE_CROSS, *_RESAMPLING)]
        if extra:
            raise ValueError(f"{model} supports the Stable Diffusion blocks only (CrossAttnDownBlock2D, DownBlock2D, "
                             f"UNetMidBlock2DCrossAttn), not {sorted(set(extra))} (the IF / unCLIP U-Net's)")
        for key in ("addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "time_embedding_act_fn",
                    "cross_attention_norm"):
            if getattr(self, key) is not None:
                raise ValueError(f"{model} does not support {key}={getattr(self, key)!r} (an IF / unCLIP U-Net "
                                 "feature); it must be null")

    # Per-block settings, broadcast as diffusers does.
    def heads(self) -> tuple[int, ...]:
        return per_block(self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels),
                         "attention_head_dim")

    def per_block(self, name: str) -> tuple:
        return per_block(getattr(self, name), len(self.block_out_channels), name)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def head_dims(self) -> tuple[int, ...]:
        """``attention_head_dim`` per block, the head width of the SimpleCrossAttn blocks (``None`` entries:
        the block's channels, one head), as diffusers reads it."""
        raw = self.per_block("attention_head_dim")
        return tuple(c if d is None else d for d, c in zip(raw, self.block_out_channels))


def _transformer(cfg: UNet2DConditionConfig, channels: int, heads: int, layers: int, cross_dim: int,
                 only_cross: bool, mk: Maker) -> Transformer2DModel:
    """``Transformer2DModel(heads, channels // heads, channels)`` as diffusers' cross-attention blocks
    build it: when ``heads`` does not divide ``channels`` the transformer runs at the narrower width
    ``heads * (channels // heads)`` between ``proj_in`` and ``proj_out``."""
    if not 0 < heads <= channels:
        raise ValueError(f"{heads} attention heads for a {channels}-channel block: each head needs at least one "
                         "channel; fix attention_head_dim / num_attention_heads")
    return Transformer2DModel(heads, channels // heads, channels, mk, num_layers=layers,
                              cross_attention_dim=cross_dim, norm_num_groups=cfg.norm_num_groups,
                              use_linear_projection=cfg.use_linear_projection, only_cross_attention=only_cross)


def _resnet(cfg: UNet2DConditionConfig, cin: int, cout: int, mk: Maker, scale: float = 1.0,
            **kw: Any) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, mk, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                         output_scale_factor=scale, **kw)


def _glide_resnet(cfg: UNet2DConditionConfig, cin: int, cout: int, mk: Maker, **kw: Any) -> ResnetBlock2D:
    """A resnet of the ResnetDownsample / SimpleCrossAttn blocks (they read ``resnet_out_scale_factor`` and
    ``resnet_skip_time_act``; ``down`` / ``up``: the resampling resnet)."""
    return _resnet(cfg, cin, cout, mk, cfg.resnet_out_scale_factor, skip_time_act=cfg.resnet_skip_time_act, **kw)


def _added_kv(cfg: UNet2DConditionConfig, channels: int, head_dim: int, text_dim: int, only_cross: bool,
              mk: Maker) -> AddedKVAttention:
    """diffusers' ``Attention(added_kv_proj_dim=...)`` of the SimpleCrossAttn blocks: ``channels // head_dim``
    heads of ``head_dim``, group norm with the resnets' groups, biases everywhere."""
    if not 0 < head_dim <= channels:
        raise ValueError(f"attention_head_dim {head_dim} for a {channels}-channel SimpleCrossAttn block: a head "
                         "is at most the block's width; fix attention_head_dim")
    return AddedKVAttention(channels, mk, heads=channels // head_dim, dim_head=head_dim, added_kv_dim=text_dim,
                            groups=cfg.norm_num_groups, only_cross_attention=only_cross,
                            cross_attention_norm=cfg.cross_attention_norm)


def build_down_blocks(cfg: UNet2DConditionConfig, mk: Maker) -> list[DownBlock]:
    """The encoder stages (``down_blocks``), shared by the U-Net and ControlNet."""
    chans, heads, head_dims = cfg.block_out_channels, cfg.heads(), cfg.head_dims()
    layers, tlayers = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")
    cross, only = cfg.per_block("cross_attention_dim"), cfg.per_block("only_cross_attention")
    blocks, cin = [], chans[0]
    for i, kind in enumerate(cfg.down_block_types):
        cout, last = chans[i], i == len(chans) - 1
        attns = down = None
        if kind in _RESAMPLING:
            resnets = [_glide_resnet(cfg, cin if j == 0 else cout, cout, mk) for j in range(layers[i])]
            if kind == "SimpleCrossAttnDownBlock2D":
                attns = [_added_kv(cfg, cout, head_dims[i], cross[i], only[i], mk) for _ in range(layers[i])]
            if not last:
                down = [_glide_resnet(cfg, cout, cout, mk, down=True)]
        else:
            resnets = [_resnet(cfg, cin if j == 0 else cout, cout, mk) for j in range(layers[i])]
            if kind == "CrossAttnDownBlock2D":
                attns = [_transformer(cfg, cout, heads[i], tlayers[i], cross[i], only[i], mk)
                         for _ in range(layers[i])]
            if not last:
                down = [Downsample2D(cout, mk, out_channels=cout, padding=cfg.downsample_padding)]
        blocks.append(DownBlock(resnets, attns, down))
        cin = cout
    return blocks


def build_mid_block(cfg: UNet2DConditionConfig, mk: Maker) -> MidBlock:
    """``UNetMidBlock2DCrossAttn`` (resnet, transformer, resnet) or ``UNetMidBlock2DSimpleCrossAttn``
    (resnet, added-KV attention, resnet)."""
    c, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
    cross = cfg.per_block("cross_attention_dim")[-1]
    if cfg.mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
        only = cfg.mid_block_only_cross_attention
        if only is None:
            only = cfg.only_cross_attention if isinstance(cfg.only_cross_attention, bool) else False
        head_dim = cfg.per_block("attention_head_dim")[-1]
        if head_dim is None:
            raise ValueError("UNetMidBlock2DSimpleCrossAttn needs an attention_head_dim (diffusers fails without)")
        resnets = [_resnet(cfg, c, c, mk, scale, skip_time_act=cfg.resnet_skip_time_act) for _ in range(2)]
        return MidBlock(resnets, [_added_kv(cfg, c, head_dim, cross, only, mk)])
    tl = cfg.per_block("transformer_layers_per_block")[-1]
    attn = _transformer(cfg, c, cfg.heads()[-1], tl, cross, False, mk)
    return MidBlock([_resnet(cfg, c, c, mk, scale), _resnet(cfg, c, c, mk, scale)], [attn])


def build_up_blocks(cfg: UNet2DConditionConfig, mk: Maker) -> list[UpBlock]:
    rchans = tuple(reversed(cfg.block_out_channels))
    rheads = tuple(reversed(cfg.heads()))
    rlayers = tuple(reversed(cfg.per_block("layers_per_block")))
    rtlayers = tuple(reversed(cfg.per_block("transformer_layers_per_block")))
    rcross = tuple(reversed(cfg.per_block("cross_attention_dim")))
    ronly = tuple(reversed(cfg.per_block("only_cross_attention")))
    raw_head_dims = cfg.per_block("attention_head_dim")  # diffusers indexes these unreversed in the up blocks
    blocks, prev = [], rchans[0]
    for i, kind in enumerate(cfg.up_block_types):
        cout, cskip_last = rchans[i], rchans[min(i + 1, len(rchans) - 1)]
        last = i == len(rchans) - 1
        n = rlayers[i] + 1
        glide = kind in _RESAMPLING
        resnets = []
        for j in range(n):
            skip = cskip_last if j == n - 1 else cout
            cin = (prev if j == 0 else cout) + skip
            resnets.append(_glide_resnet(cfg, cin, cout, mk) if glide else _resnet(cfg, cin, cout, mk))
        attns = up = None
        if kind == "CrossAttnUpBlock2D":
            attns = [_transformer(cfg, cout, rheads[i], rtlayers[i], rcross[i], ronly[i], mk) for _ in range(n)]
        elif kind == "SimpleCrossAttnUpBlock2D":
            head_dim = cout if raw_head_dims[i] is None else raw_head_dims[i]
            attns = [_added_kv(cfg, cout, head_dim, rcross[i], ronly[i], mk) for _ in range(n)]
        if not last:
            up = [_glide_resnet(cfg, cout, cout, mk, up=True) if glide else Upsample2D(cout, mk, out_channels=cout)]
        blocks.append(UpBlock(resnets, attns, up))
        prev = cout
    return blocks


def build_class_embedding(cfg: Any, mk: Maker, act_fn: str | None = None) -> nnx.Module | None:
    """diffusers' ``class_embedding``: an Embed table, a TimestepEmbedding (activation ``act_fn``, default
    the config's), or identity."""
    d, t_in = cfg.time_embed_dim, cfg.block_out_channels[0]
    if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
        return mk.embed(cfg.num_class_embeds, d)
    if cfg.class_embed_type == "timestep":
        return TimestepEmbedding(t_in, d, mk, act_fn or cfg.act_fn)
    if cfg.class_embed_type == "projection":  # diffusers builds it with the default activation, not act_fn
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, d, mk, "silu")
    return None


def embed_time_and_class(model: Any, timesteps: Any, batch: int, class_labels: Array | None) -> Array:
    """``time_embedding(time_proj(t))`` plus the class embedding, in the model's compute dtype."""
    cfg = model.config
    t = batch_timesteps(timesteps, batch)
    proj = lambda v: timestep_embedding(v, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,  # noqa: E731
                                        downscale_freq_shift=cfg.freq_shift)
    emb = model.time_embedding(proj(t).astype(model.dtype))
    has_class = model.class_embedding is not None or cfg.class_embed_type == "identity"
    if has_class:
        if class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels")
        if cfg.class_embed_type == "timestep":
            emb = emb + model.class_embedding(proj(batch_timesteps(class_labels, batch)).astype(model.dtype))
        elif cfg.class_embed_type == "identity":
            emb = emb + jnp.asarray(class_labels, model.dtype)
        elif cfg.class_embed_type == "projection":
            emb = emb + model.class_embedding(jnp.asarray(class_labels, model.dtype))
        else:
            emb = emb + model.class_embedding(jnp.asarray(class_labels, jnp.int32)).astype(model.dtype)
    elif class_labels is not None:
        raise ValueError("class_labels given but the model has no class embedding (num_class_embeds is null)")
    return emb


def collect_residuals(residuals: Residuals | None = None, down: Any = None, mid: Array | None = None,
                      intra: Any = None) -> Residuals | None:
    """One :class:`Residuals` from ``residuals`` and diffusers' keywords (all given are summed).

    ``down`` is ``down_block_additional_residuals`` (ControlNet), ``mid`` ``mid_block_additional_residual``,
    ``intra`` ``down_intrablock_additional_residuals`` (T2I-Adapter). diffusers' deprecated use of
    ``down_block_additional_residuals`` for T2I-Adapter features is not followed: they go in ``intra``.
    """
    if residuals is not None and not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must be a jaxdiff.conditioning.Residuals, got {type(residuals).__name__}")
    if down is None and mid is None and intra is None:
        return residuals
    named = Residuals(None if down is None else tuple(down), mid, None if intra is None else tuple(intra))
    return named if residuals is None else residuals + named


def _check_fits(r: Array | None, shape: tuple[int, ...], where: str) -> None:
    """``r`` must broadcast to the activations' ``shape`` without enlarging it."""
    if r is None:
        return
    try:
        fits = jnp.broadcast_shapes(r.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{where}: residual of shape {tuple(r.shape)} does not fit the activations there, "
                         f"expected shape {tuple(shape)} (NHWC)")


def _add_fitting(x: Array, r: Array | None, where: str) -> Array:
    """``x + r`` after :func:`_check_fits`."""
    _check_fits(r, x.shape, where)
    return x if r is None else x + r.astype(x.dtype)


def embed_text(model: Any, emb: Array, text: Array) -> tuple[Array, Array]:
    """The GLIDE / IF text conditioning of a U-Net: ``emb + add_embedding(text)`` (the pooled raw text,
    ``addition_embed_type="text"``), then ``time_embedding_act_fn``; the text through ``encoder_hid_proj``.
    Returns (time embedding, the text the blocks read); both unchanged for Stable Diffusion configs."""
    cfg = model.config
    if model.add_embedding is not None:
        emb = emb + model.add_embedding(text)
    if cfg.time_embedding_act_fn is not None:
        emb = activation(cfg.time_embedding_act_fn)(emb)
    if model.encoder_hid_proj is not None:
        text = model.encoder_hid_proj(text)
    return emb, text


def encode(model: Any, x: Array, emb: Array, context: Array, residuals: Residuals | None = None,
           control: Any = None, text_bias: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
    """The encoder shared by the U-Net and ControlNet: ``conv_in`` output -> (mid-block output, skips).

    ``residuals`` enter as in diffusers' ``UNet2DConditionModel.forward``: ``intra[i]`` inside
    cross-attention down block ``i`` after its last resnet/attention pair (so that skip and the
    downsampler carry it), or on the output of a plain down block (after its downsampler; that output
    is also the block's last skip, which carries it, as diffusers' in-place add does); an extra
    ``intra[len(down_blocks)]`` on the mid-block output (T2I-Adapter-XL); ``down`` on the skips after
    the whole encoder ran; ``mid`` on the mid-block output (the encoder output without a mid block).
    ``None`` entries of ``intra`` are skipped; fewer entries than down blocks are refused. ``control`` is
    the call's attention-control run (:func:`jaxdiff.models.attention_control.start`); ``text_bias`` the text
    mask's logit bias (added-KV attention only).
    """
    cfg, blocks = model.config, model.down_blocks
    intra = () if residuals is None or residuals.intra is None else tuple(residuals.intra)
    has_mid = model.mid_block is not None
    if len(intra) not in (0, len(blocks), len(blocks) + has_mid):
        extra = " (plus one for the mid-block output)" if has_mid else ""
        raise ValueError(f"expected {len(blocks)} intra-block residuals, one per down block{extra}, got {len(intra)}")
    intra += (None,) * (len(blocks) + 1 - len(intra))
    skips: tuple[Array, ...] = (x,)
    for i, block in enumerate(blocks):
        r = intra[i]
        if block.attentions is not None:
            _check_fits(r, x.shape[:3] + (cfg.block_out_channels[i],),
                        f"intra-block residual {i} (cross-attention down block)")
            x, res = block(x, emb, context, control=control, residual=r, text_bias=text_bias)
        else:
            x, res = block(x, emb, context, control=control)
            x = _add_fitting(x, r, f"intra-block residual {i} (down block output)")
            res = res[:-1] + (x,)
        skips += res
    down = None if residuals is None else residuals.down
    if down is not None:
        if len(down) != len(skips):
            raise ValueError(f"expected {len(skips)} down residuals, one per skip connection with shapes "
                             f"{[tuple(s.shape) for s in skips]}, got {len(down)}; T2I-Adapter features go in "
                             "Residuals.intra (down_intrablock_additional_residuals)")
        skips = tuple(_add_fitting(s, r, f"down residual {j}") for j, (s, r) in enumerate(zip(skips, down)))
    if has_mid:
        x = model.mid_block(x, emb, context, control=control, text_bias=text_bias)
        x = _add_fitting(x, intra[len(blocks)], f"intra-block residual {len(blocks)} (mid-block output)")
    mid = None if residuals is None else residuals.mid
    return _add_fitting(x, mid, "mid residual"), skips


class UNet2DConditionModel(nnx.Module):
    """Text-conditioned U-Net; ``__call__`` is diffusers' forward in NHWC.

    ``residuals`` (a :class:`jaxdiff.conditioning.Residuals`, NHWC) is what side networks hand the
    U-Net: ControlNet's skip and mid residuals and T2I-Adapter's intra-block features, entering where
    diffusers adds them (see :func:`encode`). diffusers' keywords ``down_block_additional_residuals``,
    ``mid_block_additional_residual`` and ``down_intrablock_additional_residuals`` are accepted too and
    summed with ``residuals``.
    ``control`` is an attention control (:mod:`jaxdiff.models.attention_control`); ``return_records=True``
    returns ``(out, records)``, the maps its :class:`~jaxdiff.models.attention_control.Record` s took.
    ``attention_mask`` (or ``encoder_attention_mask``), (B, L) with 1 / True on the text tokens to attend
    to, masks the text keys of the added-KV attention (IF / unCLIP blocks; diffusers' logit bias of
    -10000 on masked tokens); the Stable Diffusion blocks take no mask.
    """

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        mk = Maker(rngs, dtype, param_dtype)
        c0 = config.block_out_channels[0]
        self.conv_in = mk.conv(config.in_channels, c0, config.conv_in_kernel)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim, mk, config.act_fn)
        hid = config.encoder_hid_dim
        self.encoder_hid_proj = None if hid is None else mk.linear(hid, config.cross_attention_dim)
        self.class_embedding = build_class_embedding(config, mk)
        self.add_embedding = None if config.addition_embed_type != "text" else TextTimeEmbedding(
            hid or config.cross_attention_dim, config.time_embed_dim, mk, config.addition_embed_type_num_heads)
        self.down_blocks = nnx.List(build_down_blocks(config, mk))
        self.mid_block = build_mid_block(config, mk) if config.mid_block_type else None
        self.up_blocks = nnx.List(build_up_blocks(config, mk))
        self.conv_norm_out = mk.group_norm(c0, config.norm_num_groups, config.norm_eps)
        self.conv_out = mk.conv(c0, config.out_channels, config.conv_out_kernel)
        self.act = activation(config.act_fn)
        attention_control.assign_sites(self)

    def __call__(self, sample: Array, timesteps: Any, encoder_hidden_states: Array, *,
                 residuals: Residuals | None = None, control: Any = None, return_records: bool = False,
                 class_labels: Array | None = None,
                 down_block_additional_residuals: tuple[Array, ...] | None = None,
                 mid_block_additional_residual: Array | None = None,
                 down_intrablock_additional_residuals: tuple[Array, ...] | None = None,
                 attention_mask: Array | None = None, encoder_attention_mask: Array | None = None) -> Any:
        """(B, H, W, in_channels) latents, timesteps (scalar or (B,)), (B, L, D) text -> (B, H, W, out)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC with {cfg.in_channels} channels, got shape {sample.shape}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        uneven = sample.shape[1] % factor or sample.shape[2] % factor
        if uneven and any(t in _RESAMPLING for t in cfg.up_block_types):
            raise ValueError(f"the ResnetUpsample / SimpleCrossAttnUp blocks double the size exactly: height and "
                             f"width must be multiples of {factor}, got {tuple(sample.shape[1:3])} (diffusers fails "
                             "there too)")
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        emb = embed_time_and_class(self, timesteps, x.shape[0], class_labels)
        emb, context = embed_text(self, emb, encoder_hidden_states.astype(self.dtype))
        text_bias = self._text_bias(attention_mask if attention_mask is not None else encoder_attention_mask)
        run = attention_control.start(control)

        residuals = collect_residuals(residuals, down_block_additional_residuals, mid_block_additional_residual,
                                      down_intrablock_additional_residuals)
        x, skips = encode(self, self.conv_in(x), emb, context, residuals, run, text_bias)

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            # Sizes that do not halve evenly: upsample to the next skip's size, as diffusers does.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, res, emb, context, upsample_size=size, control=run, text_bias=text_bias)
        x = self.conv_out(self.act(self.conv_norm_out(x)))
        return attention_control.finish(x, run, return_records)

    def _text_bias(self, mask: Array | None) -> Array | None:
        if mask is None:
            return None
        if any(isinstance(node, Transformer2DModel) for _, node in nnx.iter_graph(self)):
            raise ValueError("attention_mask / encoder_attention_mask: jaxdiff masks the text of the added-KV "
                             "attention (SimpleCrossAttn blocks, IF / unCLIP) only; this U-Net's "
                             "CrossAttn blocks take no mask (pad the prompt embeddings instead)")
        return mask_bias(mask)


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> UNet2DConditionModel:
    """Build the U-Net abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    return build_from_tensors(UNet2DConditionModel, UNet2DConditionConfig, config_dict, tensors,
                              ignore=IGNORED_TORCH_KEYS, dtype=dtype, param_dtype=param_dtype)
