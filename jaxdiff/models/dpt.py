"""DPT (Ranftl et al. 2021, "Vision Transformers for Dense Prediction") monocular depth estimation, NHWC.

Architecture-compatible with transformers 5's ``DPTForDepthEstimation``: the parameter paths mirror its
module names, so a transformers folder (``config.json`` + ``model.safetensors``) loads by name
(:func:`jaxdiff.convert.folders.load_model_folder`). Two encoders:

- **hybrid** (``is_hybrid=True``, ``Intel/dpt-hybrid-midas``, what Stable Diffusion 2 depth ships): a BiT
  ResNet (weight-standardised convolutions, group norm; transformers' ``BitBackbone`` with
  ``layer_type="bottleneck"``) whose last feature map, projected by a 1x1 convolution, is the ViT's token
  grid; its first two stages feed the decoder directly.
- **plain ViT** (``Intel/dpt-large``): patch embedding, then the ViT; four hidden states feed the decoder.

Decoder (paper Sec. 3): reassemble (readout token "project" / "add" / "ignore", 1x1 projection, resize),
3x3 convolutions to ``fusion_hidden_size``, four RefineNet-style fusion blocks (pre-activation residual
units, bilinear 2x upsampling with ``align_corners=True``), and the head (conv, 2x upsampling, conv, ReLU,
1x1 conv, ReLU) giving an (inverse) depth map (B, H, W) at the input resolution.

:func:`resize_matrix` reproduces ``torch.nn.functional.interpolate`` ("bilinear" / "bicubic", either
``align_corners``) as a constant (out, in) matrix per axis, exact to float rounding.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.attention import attention
from jaxdiff.models.layers import Identity, KeySource, Maker, activation, config_from_dict

Array = jax.Array

__all__ = ["BitConfig", "DPTConfig", "DPTForDepthEstimation", "DPTProcessorConfig", "interpolate", "output_size",
           "preprocess", "resize_matrix"]

IGNORED_TORCH_KEYS = (r"(^|\.)num_batches_tracked$",)


# ---- torch's interpolate as matrices ---------------------------------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps around a sample at fraction ``t`` (torch's ``A = -0.75``)."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resize_matrix(n_in: int, n_out: int, mode: str = "bilinear", align_corners: bool = False) -> np.ndarray:
    """(n_out, n_in) float64 matrix of ``torch.nn.functional.interpolate(size=n_out, mode=mode,
    align_corners=align_corners)`` along one axis (no antialiasing, as torch's default)."""
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = (dst + 0.5) * (n_in / n_out) - 0.5
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if mode == "bilinear":
        src = np.maximum(src, 0.0) if not align_corners else src
        i0 = np.floor(src).astype(int)
        frac = src - i0
        i1 = np.minimum(i0 + 1, n_in - 1)
        np.add.at(m, (rows, i0), 1.0 - frac)
        np.add.at(m, (rows, i1), frac)
    elif mode == "bicubic":
        i0 = np.floor(src).astype(int)
        w = _cubic_weights(src - i0)
        for k in range(4):
            np.add.at(m, (rows, np.clip(i0 - 1 + k, 0, n_in - 1)), w[:, k])
    else:
        raise ValueError(f"resize_matrix supports mode 'bilinear' or 'bicubic', got {mode!r}")
    return m


def interpolate(x: Array, size: tuple[int, int], mode: str = "bilinear", align_corners: bool = False) -> Array:
    """``torch.nn.functional.interpolate`` on NHWC ``x`` (B, H, W, C) to ``size`` (height, width)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size) and not (mode == "bicubic" and align_corners):
        return x
    rh = jnp.asarray(resize_matrix(h, size[0], mode, align_corners), x.dtype)
    rw = jnp.asarray(resize_matrix(w, size[1], mode, align_corners), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("ph,bhwc,qw->bpqc", rh, x, rw, precision=hp)


# ---- configs -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BitConfig:
    """transformers ``BitConfig`` (the fields the DPT-Hybrid backbone reads)."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "preactivation"
    hidden_act: str = "relu"
    global_padding: str | None = None
    num_groups: int = 32
    embedding_dynamic_padding: bool = False
    output_stride: int = 32
    width_factor: int = 1
    out_features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.layer_type != "bottleneck":
            raise ValueError(f"BiT layer_type {self.layer_type!r} is not supported; jaxdiff's DPT-Hybrid backbone is "
                             "the 'bottleneck' BiT (Intel/dpt-hybrid-midas)")
        pad = None if self.global_padding is None else str(self.global_padding).upper()
        if pad not in (None, "SAME"):
            raise ValueError(f"BiT global_padding {self.global_padding!r} is not supported; use 'same' or None")
        object.__setattr__(self, "global_padding", pad)
        activation(self.hidden_act)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem",) + tuple(f"stage{i}" for i in range(1, len(self.depths) + 1))

    @property
    def features(self) -> tuple[str, ...]:
        """The stages returned as feature maps (transformers' default: the last one)."""
        return tuple(self.out_features) if self.out_features else self.stage_names[-1:]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitConfig":
        return config_from_dict(cls, dict(d))


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """transformers ``DPTConfig`` (depth estimation: the fields ``DPTForDepthEstimation`` reads)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: Any = 384
    patch_size: int = 16
    num_channels: int = 3
    is_hybrid: bool = False
    qkv_bias: bool = True
    backbone_out_indices: tuple[int, ...] = (2, 5, 8, 11)
    readout_type: str = "project"
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    fusion_hidden_size: int = 256
    head_in_index: int = -1
    use_batch_norm_in_fusion_residual: bool = False
    use_bias_in_fusion_residual: bool | None = None
    add_projection: bool = False
    backbone_featmap_shape: tuple[int, ...] | None = (1, 1024, 24, 24)
    neck_ignore_stages: tuple[int, ...] = (0, 1)
    backbone_config: BitConfig | None = None
    backbone: str | None = None

    def __post_init__(self) -> None:
        if self.use_batch_norm_in_fusion_residual:
            raise ValueError("use_batch_norm_in_fusion_residual=True is not supported by jaxdiff's DPT "
                             "(Intel/dpt-hybrid-midas and dpt-large use none)")
        if self.backbone is not None or (self.backbone_config is not None and not self.is_hybrid):
            raise ValueError("DPT with a separate backbone (DINOv2, BEiT, Swin) is not supported; jaxdiff supports "
                             "the plain ViT DPT and DPT-Hybrid (BiT + ViT)")
        if self.readout_type not in ("ignore", "add", "project"):
            raise ValueError(f"readout_type must be 'ignore', 'add' or 'project', got {self.readout_type!r}")
        if self.is_hybrid and self.readout_type != "project":
            raise ValueError("DPT-Hybrid needs readout_type='project' (as transformers requires)")
        if len(self.neck_hidden_sizes) != 4 or len(self.reassemble_factors) != 4:
            raise ValueError("DPT needs 4 neck_hidden_sizes and 4 reassemble_factors (one per decoder stage)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        activation(self.hidden_act)
        used = set(self.backbone_out_indices[2:] if self.is_hybrid else self.backbone_out_indices)
        if len(used) != (2 if self.is_hybrid else 4) or max(used) >= self.num_hidden_layers or min(used) < 0:
            want = "2 (after the 2 BiT maps)" if self.is_hybrid else "4"
            raise ValueError(f"backbone_out_indices {self.backbone_out_indices} must name {want} distinct ViT layers "
                             f"below num_hidden_layers={self.num_hidden_layers}")
        if self.is_hybrid:
            if self.backbone_config is None:
                object.__setattr__(self, "backbone_config", BitConfig(
                    layer_type="bottleneck", global_padding="same", depths=(3, 4, 9),
                    out_features=("stage1", "stage2", "stage3"), embedding_dynamic_padding=True))
            if len(self.backbone_config.features) != 3:
                raise ValueError("DPT-Hybrid needs a BiT backbone with 3 out_features (transformers' rule)")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (int(s[0]), int(s[1])) if isinstance(s, (list, tuple)) else (int(s), int(s))

    @property
    def fusion_bias(self) -> bool:
        b = self.use_bias_in_fusion_residual
        return (not self.use_batch_norm_in_fusion_residual) if b is None else bool(b)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DPTConfig":
        d = dict(d)
        bb = d.get("backbone_config")
        if isinstance(bb, Mapping):
            d["backbone_config"] = BitConfig.from_dict(bb)
        return config_from_dict(cls, d)


def _maker(rngs: nnx.Rngs | KeySource, dtype: Any, param_dtype: Any) -> Maker:
    return Maker(rngs, dtype, param_dtype, init="torch")


# ---- BiT backbone (hybrid) ------------------------------------------------------------------------

def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (transformers' ``DynamicPad2d``): total ``max((ceil(n/s)-1)*s + k - n, 0)``, less first."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class WeightStandardizedConv2d(nnx.Module):
    """transformers' ``WeightStandardizedConv2d`` (Qiao et al. 2019): each output filter standardised to zero mean
    and unit (biased) variance, ``eps`` inside the square root, then a bias-free convolution."""

    def __init__(self, cin: int, cout: int, kernel: int, mk: Maker, *, stride: int = 1, padding: str | None = "SAME",
                 eps: float = 1e-8):
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(mk.keys.params(), (kernel, kernel, cin, cout), mk.param_dtype))
        self.k, self.stride, self.padding, self.eps, self.dtype = kernel, stride, padding, eps, mk.dtype

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...].astype(jnp.float32)
        mean = w.mean(axis=(0, 1, 2), keepdims=True)
        var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
        w = ((w - mean) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        if self.padding == "SAME":
            pad = [_same_pad(x.shape[1], self.k, self.stride), _same_pad(x.shape[2], self.k, self.stride)]
        else:
            p = ((self.stride - 1) + (self.k - 1)) // 2
            pad = [(p, p), (p, p)]
        return jax.lax.conv_general_dilated(x.astype(self.dtype), w, (self.stride, self.stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)


def _norm_act(cfg: BitConfig, norm: nnx.Module, x: Array, act: bool = True) -> Array:
    """transformers' ``BitGroupNormActivation``: group norm (eps 1e-5), then the activation unless ``act`` is False."""
    x = norm(x)
    return activation(cfg.hidden_act)(x) if act else x


def _make_div(value: float, divisor: int = 8) -> int:
    """transformers' ``make_div``: round to a multiple of ``divisor``, never below 90 % of ``value``."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class BitDownsampleConv(nnx.Module):
    def __init__(self, cfg: BitConfig, cin: int, cout: int, stride: int, mk: Maker):
        self.conv = WeightStandardizedConv2d(cin, cout, 1, mk, stride=stride, padding=cfg.global_padding)
        self.norm = mk.group_norm(cout, cfg.num_groups, 1e-5)

    def __call__(self, x: Array) -> Array:
        return self.norm(self.conv(x))


class BitBottleneckLayer(nnx.Module):
    """Non-pre-activation bottleneck (ResNet v1.5, stride on the 3x3): ``act(norm3(conv3(...)) + shortcut)``."""

    def __init__(self, cfg: BitConfig, cin: int, cout: int, stride: int, first: bool, mk: Maker):
        mid = _make_div(cout * 0.25)
        pad = cfg.global_padding
        self.downsample = BitDownsampleConv(cfg, cin, cout, stride, mk) if first else None
        self.conv1 = WeightStandardizedConv2d(cin, mid, 1, mk, padding=pad)
        self.norm1 = mk.group_norm(mid, cfg.num_groups, 1e-5)
        self.conv2 = WeightStandardizedConv2d(mid, mid, 3, mk, stride=stride, padding=pad)
        self.norm2 = mk.group_norm(mid, cfg.num_groups, 1e-5)
        self.conv3 = WeightStandardizedConv2d(mid, cout, 1, mk, padding=pad)
        self.norm3 = mk.group_norm(cout, cfg.num_groups, 1e-5)
        self.cfg = cfg

    def __call__(self, x: Array) -> Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = _norm_act(self.cfg, self.norm1, self.conv1(x))
        h = _norm_act(self.cfg, self.norm2, self.conv2(h))
        h = _norm_act(self.cfg, self.norm3, self.conv3(h), act=False)
        return activation(self.cfg.hidden_act)(h + shortcut)


class BitStage(nnx.Module):
    def __init__(self, cfg: BitConfig, cin: int, cout: int, stride: int, depth: int, mk: Maker):
        self.layers = nnx.List([BitBottleneckLayer(cfg, cin if i == 0 else cout, cout, stride if i == 0 else 1, i == 0,
                                                   mk) for i in range(depth)])

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x


class BitEmbeddings(nnx.Module):
    """Stem: 7x7/2 weight-standardised convolution, group norm + activation, 3x3/2 max pool."""

    def __init__(self, cfg: BitConfig, mk: Maker):
        self.convolution = WeightStandardizedConv2d(cfg.num_channels, cfg.embedding_size, 7, mk, stride=2,
                                                    padding=cfg.global_padding)
        self.norm = mk.group_norm(cfg.embedding_size, cfg.num_groups, 1e-5)
        self.cfg = cfg
        self.same = cfg.global_padding == "SAME"
        self.dynamic_pool = cfg.embedding_dynamic_padding

    def __call__(self, x: Array) -> Array:
        x = self.convolution(x)
        if not self.same:  # ConstantPad2d(1) before the norm
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = _norm_act(self.cfg, self.norm, x)
        if self.dynamic_pool:  # zero padding (the input is post-activation), then a valid max pool
            x = jnp.pad(x, ((0, 0), _same_pad(x.shape[1], 3, 2), _same_pad(x.shape[2], 3, 2), (0, 0)))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class BitEncoder(nnx.Module):
    def __init__(self, cfg: BitConfig, mk: Maker):
        stages, cin, current = [], cfg.embedding_size, 4
        for i, (depth, size) in enumerate(zip(cfg.depths, cfg.hidden_sizes)):
            cout, stride = _make_div(size * cfg.width_factor), 1 if i == 0 else 2
            if current >= cfg.output_stride:
                raise ValueError("BiT output_stride reached inside the backbone (dilated stages) is not supported")
            stages.append(BitStage(cfg, cin, cout, stride, depth, mk))
            cin, current = cout, current * stride
        self.stages = nnx.List(stages)
        self.channels = tuple(_make_div(s * cfg.width_factor) for s in cfg.hidden_sizes[:len(cfg.depths)])

    def __call__(self, x: Array) -> list[Array]:
        states = [x]
        for stage in self.stages:
            x = stage(x)
            states.append(x)
        return states


class BitModel(nnx.Module):
    def __init__(self, cfg: BitConfig, mk: Maker):
        self.embedder = BitEmbeddings(cfg, mk)
        self.encoder = BitEncoder(cfg, mk)


class BitBackbone(nnx.Module):
    """transformers' ``BitBackbone``: the feature maps of ``out_features`` (stem = hidden state 0)."""

    def __init__(self, cfg: BitConfig, mk: Maker):
        self.bit = BitModel(cfg, mk)
        self.indices = tuple(cfg.stage_names.index(n) for n in cfg.features)

    def __call__(self, x: Array) -> list[Array]:
        states = self.bit.encoder(self.bit.embedder(x))
        return [states[i] for i in self.indices]


# ---- ViT ----------------------------------------------------------------------------------------

def _resize_pos_embed(pos: Array, gh: int, gw: int) -> Array:
    """Position embeddings (1, 1 + n*n, D): the grid part resized bilinearly to (gh, gw), as transformers."""
    tok, grid = pos[:, :1], pos[0, 1:]
    n = int(math.isqrt(grid.shape[0]))
    grid = interpolate(grid.reshape(1, n, n, -1), (gh, gw), "bilinear", False)
    return jnp.concatenate([tok, grid.reshape(1, gh * gw, -1)], axis=1)


class DPTViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        p = cfg.patch_size
        self.projection = mk.conv(cfg.num_channels, cfg.hidden_size, p, stride=p, padding=0)

    def __call__(self, x: Array) -> Array:
        y = self.projection(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class DPTViTEmbeddings(nnx.Module):
    """CLS token + patch embeddings + (resized) position embeddings."""

    def __init__(self, cfg: DPTConfig, mk: Maker):
        h, w = cfg.image_hw
        n = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.hidden_size), mk.param_dtype))
        self.patch_embeddings = DPTViTPatchEmbeddings(cfg, mk)
        self.position_embeddings = nnx.Param(jnp.zeros((1, n + 1, cfg.hidden_size), mk.param_dtype))
        self.patch_size = cfg.patch_size

    def __call__(self, x: Array) -> tuple[Array, list[Array]]:
        b, h, w, _ = x.shape
        pos = _resize_pos_embed(self.position_embeddings[...], h // self.patch_size, w // self.patch_size)
        emb = self.patch_embeddings(x)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, emb.shape[-1])).astype(emb.dtype)
        return jnp.concatenate([cls, emb], axis=1) + pos.astype(emb.dtype), []


class DPTViTHybridEmbeddings(nnx.Module):
    """BiT feature map -> 1x1 projection -> tokens; the first two BiT feature maps go to the decoder."""

    def __init__(self, cfg: DPTConfig, mk: Maker):
        h, w = cfg.image_hw
        n = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.backbone = BitBackbone(cfg.backbone_config, mk)
        feature_dim = int(cfg.backbone_featmap_shape[1])
        self.projection = mk.conv(feature_dim, cfg.hidden_size, 1, padding=0)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.hidden_size), mk.param_dtype))
        self.position_embeddings = nnx.Param(jnp.zeros((1, n + 1, cfg.hidden_size), mk.param_dtype))
        self.image_hw, self.patch_size = cfg.image_hw, cfg.patch_size

    def __call__(self, x: Array) -> tuple[Array, list[Array]]:
        b, h, w, _ = x.shape
        if (h, w) != self.image_hw:
            raise ValueError(f"DPT-Hybrid reads {self.image_hw[0]}x{self.image_hw[1]} images (its image_size), got "
                             f"{h}x{w}; resize them with jaxdiff.models.dpt.preprocess")
        pos = _resize_pos_embed(self.position_embeddings[...], h // self.patch_size, w // self.patch_size)
        maps = self.backbone(x)
        emb = self.projection(maps[-1])
        emb = emb.reshape(b, -1, emb.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, emb.shape[-1])).astype(emb.dtype)
        return jnp.concatenate([cls, emb], axis=1) + pos.astype(emb.dtype), maps[:2]


class DPTSelfAttention(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        d = cfg.hidden_size
        self.query = mk.linear(d, d, bias=cfg.qkv_bias)
        self.key = mk.linear(d, d, bias=cfg.qkv_bias)
        self.value = mk.linear(d, d, bias=cfg.qkv_bias)
        self.heads = cfg.num_attention_heads

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        out = attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.reshape(b, t, d)


class DPTDense(nnx.Module):
    """A ``dense`` Linear (transformers' ``ViTSelfOutput`` / ``ViTIntermediate`` / ``ViTOutput`` wrappers)."""

    def __init__(self, fin: int, fout: int, mk: Maker):
        self.dense = mk.linear(fin, fout)

    def __call__(self, x: Array) -> Array:
        return self.dense(x)


class DPTViTAttention(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        self.attention = DPTSelfAttention(cfg, mk)
        self.output = DPTDense(cfg.hidden_size, cfg.hidden_size, mk)

    def __call__(self, x: Array) -> Array:
        return self.output(self.attention(x))


class DPTViTLayer(nnx.Module):
    """Pre-norm ViT block: ``x + attn(ln(x))``, then ``+ mlp(ln(.))``."""

    def __init__(self, cfg: DPTConfig, mk: Maker):
        self.attention = DPTViTAttention(cfg, mk)
        self.intermediate = DPTDense(cfg.hidden_size, cfg.intermediate_size, mk)
        self.output = DPTDense(cfg.intermediate_size, cfg.hidden_size, mk)
        self.layernorm_before = mk.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)
        self.layernorm_after = mk.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)
        self.act = cfg.hidden_act

    def __call__(self, x: Array) -> Array:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(activation(self.act)(self.intermediate(self.layernorm_after(x))))


class DPTViTEncoder(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        self.layer = nnx.List([DPTViTLayer(cfg, mk) for _ in range(cfg.num_hidden_layers)])


class DPTModel(nnx.Module):
    """The ViT encoder (``dpt.*``); ``layernorm`` is loaded but the depth decoder reads the un-normalised states."""

    def __init__(self, cfg: DPTConfig, mk: Maker):
        self.embeddings = DPTViTHybridEmbeddings(cfg, mk) if cfg.is_hybrid else DPTViTEmbeddings(cfg, mk)
        self.encoder = DPTViTEncoder(cfg, mk)
        self.layernorm = mk.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: Array, keep: Sequence[int]) -> tuple[list[Array], list[Array]]:
        """(backbone feature maps, the outputs of the ViT layers listed in ``keep``), running only the layers needed."""
        h, maps = self.embeddings(x)
        out = []
        for i, layer in enumerate(self.encoder.layer[:max(keep) + 1]):
            h = layer(h)
            if i in keep:
                out.append(h)
        return maps, out


# ---- decoder ---------------------------------------------------------------------------------------

class ConvTranspose(nnx.Module):
    """``torch.nn.ConvTranspose2d(c, c, kernel_size=f, stride=f)``: non-overlapping f x f upsampling."""

    def __init__(self, cin: int, cout: int, f: int, mk: Maker):
        bound = 1.0 / math.sqrt(cout * f * f)
        key = mk.keys.params()
        # jaxdiff layout of a torch (in, out, f, f) ConvTranspose weight: (f, f, out, in)
        self.kernel = nnx.Param(jax.random.uniform(key, (f, f, cout, cin), mk.param_dtype, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(jax.random.fold_in(key, 1), (cout,), mk.param_dtype, -bound, bound))

    def __call__(self, x: Array) -> Array:
        b, h, w, _ = x.shape
        f, _, cout, _ = self.kernel.shape
        y = jnp.einsum("bhwc,ijoc->bhiwjo", x, self.kernel[...].astype(x.dtype), precision=jax.lax.Precision.HIGHEST)
        return y.reshape(b, h * f, w * f, cout) + self.bias[...].astype(x.dtype)


class DPTReassembleLayer(nnx.Module):
    def __init__(self, cfg: DPTConfig, channels: int, factor: float, mk: Maker):
        self.projection = mk.conv(cfg.hidden_size, channels, 1, padding=0)
        if factor > 1:
            self.resize = ConvTranspose(channels, channels, int(factor), mk)
        elif factor == 1:
            self.resize = Identity()
        else:
            self.resize = mk.conv(channels, channels, 3, stride=int(1 / factor), padding=1)

    def __call__(self, x: Array) -> Array:
        return self.resize(self.projection(x))


class DPTReassembleStage(nnx.Module):
    """Tokens (B, 1 + h*w, D) -> maps: readout handling, then per-stage projection and resizing."""

    def __init__(self, cfg: DPTConfig, mk: Maker):
        skip = set(cfg.neck_ignore_stages) if cfg.is_hybrid else set()
        n = len(cfg.neck_hidden_sizes)
        self.layers = nnx.List([Identity() if cfg.is_hybrid and i <= 1 else
                                DPTReassembleLayer(cfg, cfg.neck_hidden_sizes[i], cfg.reassemble_factors[i], mk)
                                for i in range(n)])
        d = cfg.hidden_size
        self.readout_projects = nnx.List([nnx.List([Identity()]) if cfg.is_hybrid and i <= 1 else
                                          nnx.List([mk.linear(2 * d, d)]) for i in range(n)]
                                         if cfg.readout_type == "project" else [])
        self.readout, self.skip, self.act = cfg.readout_type, skip, cfg.hidden_act

    def __call__(self, states: list[Array], grid: tuple[int, int]) -> list[Array]:
        out = []
        for i, h in enumerate(states):
            if i not in self.skip:
                cls, tokens = h[:, :1], h[:, 1:]
                if self.readout == "project":
                    both = jnp.concatenate([tokens, jnp.broadcast_to(cls, tokens.shape)], axis=-1)
                    tokens = activation(self.act)(self.readout_projects[i][0](both))
                elif self.readout == "add":
                    tokens = tokens + cls
                h = self.layers[i](tokens.reshape(h.shape[0], grid[0], grid[1], -1))
            out.append(h)
        return out


class DPTPreActResidualLayer(nnx.Module):
    """``x + conv2(relu(conv1(relu(x))))`` (RefineNet's residual convolution unit)."""

    def __init__(self, cfg: DPTConfig, mk: Maker):
        c = cfg.fusion_hidden_size
        self.convolution1 = mk.conv(c, c, 3, bias=cfg.fusion_bias)
        self.convolution2 = mk.conv(c, c, 3, bias=cfg.fusion_bias)

    def __call__(self, x: Array) -> Array:
        return x + self.convolution2(jax.nn.relu(self.convolution1(jax.nn.relu(x))))


class DPTFeatureFusionLayer(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        c = cfg.fusion_hidden_size
        self.projection = mk.conv(c, c, 1, padding=0)
        self.residual_layer1 = DPTPreActResidualLayer(cfg, mk)
        self.residual_layer2 = DPTPreActResidualLayer(cfg, mk)

    def __call__(self, x: Array, residual: Array | None = None) -> Array:
        if residual is not None:
            if residual.shape != x.shape:
                residual = interpolate(residual, x.shape[1:3], "bilinear", False)
            x = x + self.residual_layer1(residual)
        x = self.residual_layer2(x)
        x = interpolate(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear", True)
        return self.projection(x)


class DPTFeatureFusionStage(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        self.layers = nnx.List([DPTFeatureFusionLayer(cfg, mk) for _ in cfg.neck_hidden_sizes])

    def __call__(self, states: list[Array]) -> list[Array]:
        fused, out = None, []
        for h, layer in zip(states[::-1], self.layers):
            fused = layer(h) if fused is None else layer(fused, h)
            out.append(fused)
        return out


class DPTNeck(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        self.reassemble_stage = DPTReassembleStage(cfg, mk)
        self.convs = nnx.List([mk.conv(c, cfg.fusion_hidden_size, 3, bias=False) for c in cfg.neck_hidden_sizes])
        self.fusion_stage = DPTFeatureFusionStage(cfg, mk)

    def __call__(self, states: list[Array], grid: tuple[int, int]) -> list[Array]:
        maps = self.reassemble_stage(states, grid)
        return self.fusion_stage([conv(m) for conv, m in zip(self.convs, maps)])


class DPTDepthEstimationHead(nnx.Module):
    def __init__(self, cfg: DPTConfig, mk: Maker):
        f = cfg.fusion_hidden_size
        self.projection = mk.conv(256, 256, 3) if cfg.add_projection else None
        self.head = nnx.List([mk.conv(f, f // 2, 3), Identity(), mk.conv(f // 2, 32, 3), Identity(),
                              mk.conv(32, 1, 1, padding=0), Identity()])
        self.index = cfg.head_in_index

    def __call__(self, states: list[Array]) -> Array:
        x = states[self.index]
        if self.projection is not None:
            x = jax.nn.relu(self.projection(x))
        x = self.head[0](x)
        x = interpolate(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear", True)
        x = jax.nn.relu(self.head[2](x))
        return jax.nn.relu(self.head[4](x))[..., 0]


class DPTForDepthEstimation(nnx.Module):
    """Compatible with ``transformers.DPTForDepthEstimation``: pixel values (B, H, W, 3) NHWC -> predicted depth
    (B, H, W) (relative inverse depth: larger is nearer)."""

    config_class = DPTConfig

    def __init__(self, config: DPTConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.config = config
        mk = _maker(rngs, dtype, param_dtype)
        self.dpt = DPTModel(config, mk)
        self.neck = DPTNeck(config, mk)
        self.head = DPTDepthEstimationHead(config, mk)

    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.config
        x = jnp.asarray(pixel_values)
        if x.ndim != 4 or x.shape[-1] != cfg.num_channels:
            raise ValueError(f"DPT pixel values must be NHWC (B, H, W, {cfg.num_channels}), got shape {x.shape}")
        keep = tuple(cfg.backbone_out_indices[2:] if cfg.is_hybrid else cfg.backbone_out_indices)
        maps, states = self.dpt(x, keep)
        grid = (x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size)
        return self.head(self.neck(maps + states, grid))


# ---- image preprocessing (transformers' DPTImageProcessor) ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class DPTProcessorConfig:
    """``preprocessor_config.json`` of a ``DPTImageProcessor`` / ``DPTFeatureExtractor`` (defaults: transformers')."""

    do_resize: bool = True
    size: Any = dataclasses.field(default_factory=lambda: {"height": 384, "width": 384})
    resample: int = 3  # PIL.Image.BICUBIC
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = False
    size_divisor: int | None = None
    do_center_crop: bool | None = None
    crop_size: Any = None

    def __post_init__(self) -> None:
        _hw(self.size, "size")
        if self.do_center_crop:
            raise ValueError("a DPT processor with do_center_crop=True is not supported (transformers' own backends "
                             "disagree: the PIL one ignores it); set it to false")

    @property
    def hw(self) -> tuple[int, int]:
        return _hw(self.size, "size")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DPTProcessorConfig":
        d = dict(d)
        for k in ("size", "crop_size"):
            if isinstance(d.get(k), Mapping):
                d[k] = dict(d[k])
        return config_from_dict(cls, d)


def _hw(s: Any, name: str) -> tuple[int, int]:
    """A processor size (``{"height", "width"}``, one int for a square, or a pair) as (height, width)."""
    if isinstance(s, Mapping):
        if "height" not in s or "width" not in s:
            raise ValueError(f"the DPT processor's {name} must give height and width, got {dict(s)}")
        return int(s["height"]), int(s["width"])
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return int(s), int(s)
    if isinstance(s, (list, tuple)) and len(s) == 2:
        return int(s[0]), int(s[1])
    raise ValueError(f"the DPT processor's {name} must be {{'height': h, 'width': w}} or an int, got {s!r}")


def _constrain(value: float, multiple: int) -> int:
    """transformers' ``constrain_to_multiple_of`` (no bounds): the nearest multiple (Python rounding)."""
    return int(round(value / multiple) * multiple)


def output_size(height: int, width: int, cfg: DPTProcessorConfig) -> tuple[int, int]:
    """The resized (height, width): ``size``, or with ``keep_aspect_ratio`` the scale closest to 1 of the two
    applied to both sides; each side then rounded to a multiple of ``ensure_multiple_of``."""
    oh, ow = cfg.hw
    sh, sw = oh / height, ow / width
    if cfg.keep_aspect_ratio:
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh
    return _constrain(sh * height, cfg.ensure_multiple_of), _constrain(sw * width, cfg.ensure_multiple_of)


def _as_hwc(image: Any) -> tuple[np.ndarray, bool]:
    """(H, W, 3) array and whether it is 8-bit (PIL / uint8: values 0..255) rather than floats in [0, 1]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB")), True
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"a depth-estimator image must be RGB (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr, True
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        raise ValueError(f"float images are in [0, 1], got values in [{arr.min():.3g}, {arr.max():.3g}]")
    return arr, False


def _resize_pil(arr: np.ndarray, eight_bit: bool, hw: tuple[int, int], resample: int) -> np.ndarray:
    from PIL import Image

    if eight_bit:
        return np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), resample=resample), np.float32)
    chans = [np.asarray(Image.fromarray(arr[..., c], mode="F").resize((hw[1], hw[0]), resample=resample))
             for c in range(arr.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32)


def preprocess(images: Any, config: Mapping[str, Any] | DPTProcessorConfig | None = None) -> np.ndarray:
    """Pixel values (B, H, W, 3) float32 for :class:`DPTForDepthEstimation`, as ``DPTImageProcessor`` makes them.

    ``images``: a PIL image, an (H, W, 3) array, or a list of them (all one size). 8-bit images (PIL, uint8) are
    resized with PIL's filter ``resample`` (transformers' PIL backend; its torchvision backend agrees to about one
    grey level), then multiplied by ``rescale_factor``; float arrays are taken in [0, 1] (already rescaled),
    resized in float. Then ``(x - image_mean) / image_std`` and, with ``do_pad``, centred zero padding to a
    multiple of ``size_divisor``.
    """
    cfg = config if isinstance(config, DPTProcessorConfig) else DPTProcessorConfig.from_dict(config or {})
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("give at least one image to the depth estimator")
    out = []
    for image in items:
        arr, eight_bit = _as_hwc(image)
        hw = output_size(arr.shape[0], arr.shape[1], cfg) if cfg.do_resize else arr.shape[:2]
        x = _resize_pil(arr, eight_bit, hw, cfg.resample) if tuple(hw) != arr.shape[:2] else arr.astype(np.float32)
        if eight_bit and cfg.do_rescale:
            x = x * np.float32(cfg.rescale_factor)
        if cfg.do_normalize:
            x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
        if cfg.do_pad and cfg.size_divisor:
            ph = -x.shape[0] % cfg.size_divisor
            pw = -x.shape[1] % cfg.size_divisor
            x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        out.append(x.astype(np.float32))
    if len({o.shape for o in out}) != 1:
        raise ValueError(f"the depth estimator's images come out in different sizes {sorted({o.shape for o in out})}; "
                         "give images of one size")
    return np.stack(out)
