"""Conditional U-Net of latent diffusion (Stable Diffusion 1.x / 2.x), NHWC.

Architecture-compatible with diffusers' ``UNet2DConditionModel`` (Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models"): a DDPM U-Net whose stages interleave
residual blocks with spatial transformers that cross-attend to text embeddings. Parameter names
mirror diffusers, so its checkpoints load with :func:`from_pretrained_tensors`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.conditioning import Residuals
from jaxdiff.convert.torch_layout import abstract, load_torch_tensors
from jaxdiff.models import attention_control
from jaxdiff.models.layers import (
    DownBlock,
    Downsample2D,
    Maker,
    MidBlock,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    UpBlock,
    Upsample2D,
    activation,
    batch_timesteps,
    check_block_types,
    config_from_dict,
    per_block,
    timestep_embedding,
)

Array = jax.Array

IGNORED_TORCH_KEYS: tuple[str, ...] = ()

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """The ``config.json`` keys of diffusers' ``UNet2DConditionModel`` that jaxdiff supports.

    As in diffusers, ``attention_head_dim`` is (for historical reasons) the number of heads per
    block unless ``num_attention_heads`` is given; each head is ``channels // heads`` wide, so
    heads that do not divide a block's channels give a narrower attention (as in diffusers).
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
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; use 'UNetMidBlock2DCrossAttn'")
        if self.class_embed_type not in _CLASS_EMBED_TYPES:
            raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r}; supported: {_CLASS_EMBED_TYPES}")
        if self.time_embedding_type != "positional":
            raise ValueError("only time_embedding_type='positional' is supported")
        unsupported = {
            "addition_embed_type": self.addition_embed_type, "encoder_hid_dim": self.encoder_hid_dim,
            "encoder_hid_dim_type": self.encoder_hid_dim_type, "time_cond_proj_dim": self.time_cond_proj_dim,
            "time_embedding_act_fn": self.time_embedding_act_fn, "timestep_post_act": self.timestep_post_act,
        }
        for key, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{key}={value!r} is not supported (SDXL/Kandinsky/LCM features); it must be null")
        if self.dual_cross_attention or self.class_embeddings_concat or self.attention_type != "default":
            raise ValueError("dual_cross_attention, class_embeddings_concat and gated attention are not supported")
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim is None:
            raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim")

    # Per-block settings, broadcast as diffusers does.
    def heads(self) -> tuple[int, ...]:
        return per_block(self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels),
                         "attention_head_dim")

    def per_block(self, name: str) -> tuple:
        return per_block(getattr(self, name), len(self.block_out_channels), name)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


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


def _resnet(cfg: UNet2DConditionConfig, cin: int, cout: int, mk: Maker, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, mk, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                         output_scale_factor=scale)


def build_down_blocks(cfg: UNet2DConditionConfig, mk: Maker) -> list[DownBlock]:
    """The encoder stages (``down_blocks``), shared by the U-Net and ControlNet."""
    chans, heads = cfg.block_out_channels, cfg.heads()
    layers, tlayers = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")
    cross, only = cfg.per_block("cross_attention_dim"), cfg.per_block("only_cross_attention")
    blocks, cin = [], chans[0]
    for i, kind in enumerate(cfg.down_block_types):
        cout = chans[i]
        resnets = [_resnet(cfg, cin if j == 0 else cout, cout, mk) for j in range(layers[i])]
        attns = None
        if kind == "CrossAttnDownBlock2D":
            attns = [_transformer(cfg, cout, heads[i], tlayers[i], cross[i], only[i], mk) for _ in range(layers[i])]
        down = None
        if i < len(chans) - 1:
            down = [Downsample2D(cout, mk, out_channels=cout, padding=cfg.downsample_padding)]
        blocks.append(DownBlock(resnets, attns, down))
        cin = cout
    return blocks


def build_mid_block(cfg: UNet2DConditionConfig, mk: Maker) -> MidBlock:
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""
    c, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
    tl = cfg.per_block("transformer_layers_per_block")[-1]
    attn = _transformer(cfg, c, cfg.heads()[-1], tl, cfg.per_block("cross_attention_dim")[-1], False, mk)
    return MidBlock([_resnet(cfg, c, c, mk, scale), _resnet(cfg, c, c, mk, scale)], [attn])


def build_up_blocks(cfg: UNet2DConditionConfig, mk: Maker) -> list[UpBlock]:
    rchans = tuple(reversed(cfg.block_out_channels))
    rheads = tuple(reversed(cfg.heads()))
    rlayers = tuple(reversed(cfg.per_block("layers_per_block")))
    rtlayers = tuple(reversed(cfg.per_block("transformer_layers_per_block")))
    rcross = tuple(reversed(cfg.per_block("cross_attention_dim")))
    ronly = tuple(reversed(cfg.per_block("only_cross_attention")))
    blocks, prev = [], rchans[0]
    for i, kind in enumerate(cfg.up_block_types):
        cout, cskip_last = rchans[i], rchans[min(i + 1, len(rchans) - 1)]
        n = rlayers[i] + 1
        resnets = []
        for j in range(n):
            skip = cskip_last if j == n - 1 else cout
            resnets.append(_resnet(cfg, (prev if j == 0 else cout) + skip, cout, mk))
        attns = None
        if kind == "CrossAttnUpBlock2D":
            attns = [_transformer(cfg, cout, rheads[i], rtlayers[i], rcross[i], ronly[i], mk) for _ in range(n)]
        up = [Upsample2D(cout, mk, out_channels=cout)] if i < len(rchans) - 1 else None
        blocks.append(UpBlock(resnets, attns, up))
        prev = cout
    return blocks


def build_class_embedding(cfg: Any, mk: Maker) -> nnx.Module | None:
    """diffusers' ``class_embedding``: an Embed table, a TimestepEmbedding, or identity."""
    d, t_in = cfg.time_embed_dim, cfg.block_out_channels[0]
    if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
        return mk.embed(cfg.num_class_embeds, d)
    if cfg.class_embed_type == "timestep":
        return TimestepEmbedding(t_in, d, mk, cfg.act_fn)
    if cfg.class_embed_type == "projection":
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, d, mk, cfg.act_fn)
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


def encode(model: Any, x: Array, emb: Array, context: Array, residuals: Residuals | None = None,
           control: Any = None) -> tuple[Array, tuple[Array, ...]]:
    """The encoder shared by the U-Net and ControlNet: ``conv_in`` output -> (mid-block output, skips).

    ``residuals`` enter as in diffusers' ``UNet2DConditionModel.forward``: ``intra[i]`` inside
    cross-attention down block ``i`` after its last resnet/attention pair (so that skip and the
    downsampler carry it), or on the output of a plain down block (after its downsampler; that output
    is also the block's last skip, which carries it, as diffusers' in-place add does); an extra
    ``intra[len(down_blocks)]`` on the mid-block output (T2I-Adapter-XL); ``down`` on the skips after
    the whole encoder ran; ``mid`` on the mid-block output (the encoder output without a mid block).
    ``None`` entries of ``intra`` are skipped; fewer entries than down blocks are refused. ``control`` is
    the call's attention-control run (:func:`jaxdiff.models.attention_control.start`).
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
            x, res = block(x, emb, context, control=control, residual=r)
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
        x = model.mid_block(x, emb, context, control=control)
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
        self.class_embedding = build_class_embedding(config, mk)
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
                 down_intrablock_additional_residuals: tuple[Array, ...] | None = None) -> Any:
        """(B, H, W, in_channels) latents, timesteps (scalar or (B,)), (B, L, D) text -> (B, H, W, out)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC with {cfg.in_channels} channels, got shape {sample.shape}")
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        emb = embed_time_and_class(self, timesteps, x.shape[0], class_labels)
        context = encoder_hidden_states.astype(self.dtype)
        run = attention_control.start(control)

        residuals = collect_residuals(residuals, down_block_additional_residuals, mid_block_additional_residual,
                                      down_intrablock_additional_residuals)
        x, skips = encode(self, self.conv_in(x), emb, context, residuals, run)

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            # Sizes that do not halve evenly: upsample to the next skip's size, as diffusers does.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, res, emb, context, upsample_size=size, control=run)
        x = self.conv_out(self.act(self.conv_norm_out(x)))
        return attention_control.finish(x, run, return_records)


def from_pretrained_tensors(config_dict: Mapping[str, Any], tensors: Mapping[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> UNet2DConditionModel:
    """Build the U-Net abstractly from ``config.json`` and fill it with PyTorch-named tensors."""
    cfg = UNet2DConditionConfig.from_dict(config_dict)
    model = abstract(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return load_torch_tensors(model, tensors, ignore=IGNORED_TORCH_KEYS, dtype=param_dtype)
