"""Original (CompVis / Stability "LDM") single-file Stable Diffusion checkpoints, read as diffusers networks.

An SD 1.x / 2.x ``.safetensors`` file from the original repositories holds the whole model under
its training-code names: ``model.diffusion_model.*`` (the U-Net: ``input_blocks``, ``middle_block``,
``output_blocks``, ``time_embed``, ``label_emb``, ``out``), ``first_stage_model.*`` (the VAE:
``encoder/decoder.down/up/mid``, ``nin_shortcut``, mid-block attention ``q/k/v/proj_out`` as 1x1
convolutions) and ``cond_stage_model.*`` (the text encoder: SD 1.x ships transformers' CLIP under
``cond_stage_model.transformer.``; SD 2.x ships OpenCLIP under ``cond_stage_model.model.`` with a fused
``in_proj_weight``, ``positional_embedding``, ``token_embedding``, ``ln_final`` and ``text_projection``).

This module renames (lazily: one tensor at a time from the memory-mapped file) those tensors to the
diffusers / transformers names jaxdiff's networks load, and infers each network's config from the
tensor shapes, following the conventions of the original configs (``v1-inference.yaml``,
``v2-inference(-v).yaml``) as diffusers' ``from_single_file`` does:

- U-Net: channels, channel multipliers, layers per block, which blocks attend, the context width,
  transformer depth and ``use_linear_projection`` (2-D ``proj_in``) come from shapes. Heads cannot:
  SD 1.x uses 8 heads per block (``num_heads: 8``), SD 2.x 64 channels per head
  (``num_head_channels: 64``); jaxdiff picks 8 heads for convolutional ``proj_in`` and 64-channel heads
  for linear ``proj_in``. Group norms have 32 groups (the original ``GroupNorm32``).
- VAE: channels, multipliers, layers and latent channels from shapes; ``scaling_factor`` 0.18215.
- Text: SD 1.x CLIP ViT-L/14 (``quick_gelu``, 64-channel heads); SD 2.x OpenCLIP ViT-H (``gelu``,
  64-channel heads), of which SD 2.x uses the *penultimate* layer: the last resblock is dropped and
  ``ln_final`` applied after the one before, exactly what diffusers' 23-layer SD 2.x text encoder does.

Prediction type and training image size are not in the weights. Defaults follow diffusers'
``from_single_file``: SD 1.x is epsilon at 512 px; SD 2.x (OpenCLIP text) is taken to be the 768-v
model (``v_prediction``, 768 px, as ``stabilityai/stable-diffusion-2-1``); for the 512-base SD 2.x
models pass ``prediction_type="epsilon"`` and ``image_size=512`` (or a config).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
import re
from typing import Any

import numpy as np

from jaxdiff.convert.folders import _read_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."

SD_GROUPS = 32              # GroupNorm32 in the original code
SD1_HEADS = 8               # v1-inference.yaml: num_heads 8
SD2_HEAD_CHANNELS = 64      # v2-inference.yaml: num_head_channels 64
TEXT_HEAD_CHANNELS = 64     # CLIP ViT-L/14 and OpenCLIP ViT-H text towers
VAE_SCALING_FACTOR = 0.18215

# The scheduler Stable Diffusion 1.x / 2.x was trained with (DDIM flavour of diffusers' SD configs).
DEFAULT_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
    "timestep_spacing": "leading", "prediction_type": "epsilon",
}


# ---------------------------------------------------------------------------------------------
# A renamed, lazily transformed view of the file's tensors.


@dataclass(frozen=True)
class Source:
    """Where one diffusers tensor comes from: the LDM key and an operation on it.

    ``op``: ``""`` as is, ``"squeeze"`` a 1x1 convolution kernel as a linear one, ``"q"``/``"k"``/``"v"``
    the first/second/third row block of a fused ``in_proj`` (OpenCLIP's ``nn.MultiheadAttention``).
    """

    key: str
    op: str = ""


_THIRDS = {"q": 0, "k": 1, "v": 2}


def _apply(op: str, x: np.ndarray) -> np.ndarray:
    if op == "squeeze":
        return x.reshape(x.shape[:2]) if x.ndim > 2 else x
    if op in _THIRDS:
        n = x.shape[0] // 3
        return x[_THIRDS[op] * n:(_THIRDS[op] + 1) * n]
    return x


def _apply_shape(op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if op == "squeeze":
        return tuple(shape[:2]) if len(shape) > 2 else tuple(shape)
    if op in _THIRDS:
        return (shape[0] // 3, *shape[1:])
    return tuple(shape)


class RenamedView(Mapping[str, Any]):
    """``plan``'s diffusers names over ``inner``'s LDM tensors (read, sliced or squeezed on access)."""

    def __init__(self, inner: Mapping[str, Any], plan: Mapping[str, Source]):
        self.inner, self.plan = inner, dict(plan)
        shapes = getattr(inner, "shapes", None)
        self.shapes = None if shapes is None else {k: _apply_shape(s.op, shapes[s.key]) for k, s in self.plan.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        src = self.plan[name]
        return _apply(src.op, np.asarray(self.inner[src.key]))

    def release(self, name: str) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None and name in self.plan:
            release(self.plan[name].key)  # file-backed pages: a later read of a sibling slice maps them again

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def is_ldm_layout(keys: Any) -> bool:
    """True when the tensor names are the original layout (a U-Net under ``model.diffusion_model.``)."""
    return any(str(k).startswith(UNET_PREFIX) for k in keys)


def text_encoder_kind(keys: Any) -> str:
    """``"clip"`` (SD 1.x), ``"open_clip"`` (SD 2.x); raises for SDXL and files without a text encoder."""
    keys = list(keys)
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "open_clip"
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "clip"
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        raise ValueError("this is an SDXL single-file checkpoint (conditioner.embedders.*); jaxdiff loads SD 1.x "
                         "and 2.x single files only: convert it with diffusers' from_single_file(...).save_pretrained()")
    raise ValueError("the checkpoint has no text encoder (no cond_stage_model.* tensors); jaxdiff loads complete "
                     "SD 1.x / 2.x single files (U-Net, VAE and text encoder): use the model's diffusers folder instead")


def _strip(keys: Any, prefix: str) -> dict[str, str]:
    """Short name (prefix removed) -> full key, for the keys under ``prefix``."""
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _indices(names: Any, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


# ---------------------------------------------------------------------------------------------
# U-Net.

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_UNET_TOP = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "label_emb.0.0.": "class_embedding.linear_1.", "label_emb.0.2.": "class_embedding.linear_2.",
             "label_emb.weight": "class_embedding.weight"}


def _resnet_name(rest: str) -> str:
    for old, new in _RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ValueError(f"unknown U-Net resnet tensor {rest!r}")


def unet_layout(names: Any) -> dict[str, Any]:
    """The U-Net's structure read from its (prefix-free) tensor names: levels, layers per block, upsamplers."""
    names = list(names)
    n_in = len(_indices(names, r"input_blocks\.(\d+)\."))
    downs = _indices(names, r"input_blocks\.(\d+)\.0\.op\.")
    levels = len(downs) + 1
    if n_in < 2 or (n_in - levels) % levels:
        raise ValueError(f"cannot read the U-Net layout: {n_in} input blocks and {levels} levels")
    return {"levels": levels, "layers": (n_in - levels) // levels, "inputs": n_in,
            "outputs": len(_indices(names, r"output_blocks\.(\d+)\."))}


def unet_plan(keys: Any, layers_per_block: int | None = None) -> dict[str, Source]:
    """diffusers ``UNet2DConditionModel`` name -> LDM key, for every U-Net tensor of the file."""
    short = _strip(keys, UNET_PREFIX)
    lay = unet_layout(short)
    per = (layers_per_block if layers_per_block is not None else lay["layers"]) + 1
    plan: dict[str, Source] = {}
    for name, full in short.items():
        new = _unet_name(name, per)
        if new is not None:
            plan[new] = Source(full)
    return plan


def _unet_name(name: str, per: int) -> str | None:
    for old, new in _UNET_TOP.items():
        if name.startswith(old):
            return new + name[len(old):]
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", name)
    if m:
        i, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, j = (i - 1) // per, (i - 1) % per
        if rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if part == 0:
            return f"down_blocks.{block}.resnets.{j}.{_resnet_name(rest)}"
        return f"down_blocks.{block}.attentions.{j}.{rest}"  # SpatialTransformer names = diffusers' Transformer2DModel
    m = re.match(r"middle_block\.(\d+)\.(.*)", name)
    if m:
        part, rest = int(m.group(1)), m.group(2)
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{part // 2}.{_resnet_name(rest)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", name)
    if m:
        i, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, j = i // per, i % per
        if part == 0:
            return f"up_blocks.{block}.resnets.{j}.{_resnet_name(rest)}"
        if rest.startswith("conv."):  # Upsample (index 1 without attention, 2 with)
            return f"up_blocks.{block}.upsamplers.0.conv.{rest[5:]}"
        return f"up_blocks.{block}.attentions.{j}.{rest}"
    raise ValueError(f"unknown U-Net tensor {UNET_PREFIX}{name}")


def infer_encoder_config(s: Mapping[str, tuple[int, ...]], *, linear_heads: int = SD2_HEAD_CHANNELS,
                         conv_heads: int = SD1_HEADS) -> dict[str, Any]:
    """The config keys a U-Net and a ControlNet share (the encoder: ``input_blocks``, ``middle_block``,
    ``time_embed``, ``label_emb``), read from prefix-free tensor shapes (see the module doc for the heads)."""
    lay = unet_layout(s)
    per = lay["layers"] + 1
    channels, down_types, depth = [], [], []
    linear = False  # transformer depth per level: 1 where the level has no attention (diffusers ignores it)
    for b in range(lay["levels"]):
        first = 1 + b * per
        channels.append(s[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        attn = f"input_blocks.{first}.1."
        if f"{attn}proj_in.weight" in s:
            down_types.append("CrossAttnDownBlock2D")
            linear = len(s[f"{attn}proj_in.weight"]) == 2
            depth.append(len(_indices(s, re.escape(attn) + r"transformer_blocks\.(\d+)\.")))
        else:
            down_types.append("DownBlock2D")
            depth.append(1)
    ctx = [v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight")]
    if not ctx:
        raise ValueError("the U-Net has no cross-attention (attn2) layers: not a text-conditioned Stable Diffusion U-Net")
    heads = [max(c // linear_heads, 1) for c in channels] if linear else conv_heads
    config: dict[str, Any] = {
        "in_channels": s["input_blocks.0.0.weight"][1],
        "down_block_types": down_types,
        "block_out_channels": channels,
        "layers_per_block": lay["layers"],
        "cross_attention_dim": ctx[0],
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "norm_num_groups": SD_GROUPS,
    }
    if "label_emb.weight" in s:
        config["num_class_embeds"] = s["label_emb.weight"][0]
    elif "label_emb.0.0.weight" in s:
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = s["label_emb.0.0.weight"][1]
    return config


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]], *, linear_heads: int = SD2_HEAD_CHANNELS,
                      conv_heads: int = SD1_HEADS, image_size: int = 512, vae_factor: int = 8) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config read from the U-Net's tensor shapes (see the module doc)."""
    s = {k[len(UNET_PREFIX):]: tuple(v) for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    if not s:
        raise ValueError(f"no U-Net in the checkpoint (no {UNET_PREFIX}* tensors)")
    encoder = infer_encoder_config(s, linear_heads=linear_heads, conv_heads=conv_heads)
    per = encoder["layers_per_block"] + 1
    up_types = ["CrossAttnUpBlock2D" if f"output_blocks.{b * per}.1.proj_in.weight" in s else "UpBlock2D"
                for b in range(len(encoder["block_out_channels"]))]
    return {"_class_name": "UNet2DConditionModel", "sample_size": image_size // vae_factor, **encoder,
            "out_channels": s["out.2.weight"][0], "up_block_types": up_types}


# ---------------------------------------------------------------------------------------------
# VAE.

_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def vae_plan(keys: Any) -> dict[str, Source]:
    """diffusers ``AutoencoderKL`` name -> LDM key (1x1-conv attention kernels squeezed to linear)."""
    short = _strip(keys, VAE_PREFIX)
    n_up = len(_indices(short, r"decoder\.up\.(\d+)\."))
    plan: dict[str, Source] = {}
    for name, full in short.items():
        new, op = _vae_name(name, n_up)
        plan[new] = Source(full, op)
    return plan


def _vae_resnet(rest: str) -> str:
    return rest.replace("nin_shortcut.", "conv_shortcut.")


def _vae_name(name: str, n_up: int) -> tuple[str, str]:
    m = re.match(r"(encoder|decoder)\.(.*)", name)
    if not m:
        return name, ""  # quant_conv, post_quant_conv
    side, rest = m.groups()
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[9:]}", ""
    m = re.match(r"down\.(\d+)\.block\.(\d+)\.(.*)", rest)
    if m:
        return f"{side}.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{_vae_resnet(m.group(3))}", ""
    m = re.match(r"down\.(\d+)\.downsample\.(.*)", rest)
    if m:
        return f"{side}.down_blocks.{m.group(1)}.downsamplers.0.{m.group(2)}", ""
    m = re.match(r"up\.(\d+)\.block\.(\d+)\.(.*)", rest)
    if m:  # the decoder's up levels are stored lowest resolution last; diffusers counts from the lowest
        return f"{side}.up_blocks.{n_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.{_vae_resnet(m.group(3))}", ""
    m = re.match(r"up\.(\d+)\.upsample\.(.*)", rest)
    if m:
        return f"{side}.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.{m.group(2)}", ""
    m = re.match(r"mid\.block_(\d+)\.(.*)", rest)
    if m:
        return f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{_vae_resnet(m.group(2))}", ""
    m = re.match(r"mid\.attn_1\.(.*)", rest)
    if m:
        for old, new in _VAE_ATTN.items():
            if m.group(1).startswith(old):
                return f"{side}.mid_block.attentions.0.{new}{m.group(1)[len(old):]}", "squeeze"
    return f"{side}.{rest}", ""  # conv_in, conv_out


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], *, image_size: int = 512,
                     scaling_factor: float = VAE_SCALING_FACTOR) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config read from the VAE's tensor shapes."""
    s = {k[len(VAE_PREFIX):]: tuple(v) for k, v in shapes.items() if k.startswith(VAE_PREFIX)}
    if not s:
        raise ValueError(f"no VAE in the checkpoint (no {VAE_PREFIX}* tensors); jaxdiff loads complete SD 1.x / 2.x "
                         "single files: use the model's diffusers folder instead")
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    channels = [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": s["decoder.conv_in.weight"][1],
        "norm_num_groups": SD_GROUPS,
        "sample_size": image_size,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
    }


# ---------------------------------------------------------------------------------------------
# Text encoders.


def clip_plan(keys: Any) -> dict[str, Source]:
    """SD 1.x: transformers' CLIP under ``cond_stage_model.transformer.``: the names as they are."""
    return {name: Source(full) for name, full in _strip(keys, CLIP_PREFIX).items()}


_OPEN_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPEN_CLIP_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}


def open_clip_layers(keys: Any) -> int:
    """Number of OpenCLIP resblocks in the file."""
    return len(_indices(_strip(keys, OPEN_CLIP_PREFIX), r"transformer\.resblocks\.(\d+)\."))


def open_clip_plan(keys: Any, num_layers: int) -> dict[str, Source]:
    """SD 2.x: OpenCLIP under ``cond_stage_model.model.`` -> transformers ``CLIPTextModel`` names, keeping the
    first ``num_layers`` resblocks (SD 2.x: all but the last) and splitting the fused ``in_proj`` into q, k, v."""
    plan: dict[str, Source] = {}
    for name, full in _strip(keys, OPEN_CLIP_PREFIX).items():
        if name in _OPEN_CLIP_TOP:
            plan[_OPEN_CLIP_TOP[name]] = Source(full)
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", name)
        if not m or int(m.group(1)) >= num_layers:
            continue  # text_projection, logit_scale, attn_mask, the unused last layer
        out = f"text_model.encoder.layers.{m.group(1)}."
        rest = m.group(2)
        fused = re.match(r"attn\.in_proj_(weight|bias)$", rest)
        if fused:
            for part in "qkv":
                plan[f"{out}self_attn.{part}_proj.{fused.group(1)}"] = Source(full, part)
            continue
        for old, new in _OPEN_CLIP_BLOCK.items():
            if rest.startswith(old):
                plan[out + new + rest[len(old):]] = Source(full)
                break
        else:
            raise ValueError(f"unknown OpenCLIP tensor {full}")
    return plan


def infer_text_config(shapes: Mapping[str, tuple[int, ...]], kind: str) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict for the SD 1.x CLIP or SD 2.x OpenCLIP text tower."""
    if kind == "clip":
        s = {k[len(CLIP_PREFIX):].removeprefix("text_model."): tuple(v) for k, v in shapes.items()
             if k.startswith(CLIP_PREFIX)}
        vocab, hidden = s["embeddings.token_embedding.weight"]
        positions = s["embeddings.position_embedding.weight"][0]
        layers = len(_indices(s, r"encoder\.layers\.(\d+)\."))
        inner = s["encoder.layers.0.mlp.fc1.weight"][0]
        act, projection = "quick_gelu", hidden
    else:
        s = {k[len(OPEN_CLIP_PREFIX):]: tuple(v) for k, v in shapes.items() if k.startswith(OPEN_CLIP_PREFIX)}
        vocab, hidden = s["token_embedding.weight"]
        positions = s["positional_embedding"][0]
        layers = open_clip_layers(shapes) - 1  # SD 2.x reads the penultimate layer
        inner = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
        act = "gelu"
        projection = s["text_projection"][1] if "text_projection" in s else hidden
    if layers < 1:
        raise ValueError("the text encoder has too few layers to read its penultimate one")
    return {
        "architectures": ["CLIPTextModel"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inner, "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // TEXT_HEAD_CHANNELS, 1), "max_position_embeddings": positions,
        "hidden_act": act, "projection_dim": projection, "layer_norm_eps": 1e-5, "eos_token_id": vocab - 1,
    }


# ---------------------------------------------------------------------------------------------
# The whole file.


def default_settings(kind: str) -> tuple[str, int]:
    """(prediction type, training image size) assumed for a text-encoder kind (diffusers' defaults)."""
    return ("v_prediction", 768) if kind == "open_clip" else ("epsilon", 512)


def infer_configs(shapes: Mapping[str, tuple[int, ...]], *, prediction_type: str | None = None,
                  image_size: int | None = None) -> dict[str, dict[str, Any]]:
    """``{"unet", "vae", "text_encoder", "scheduler"}`` configs (diffusers / transformers dicts) inferred from shapes."""
    kind = text_encoder_kind(shapes)
    default_pred, default_size = default_settings(kind)
    size = int(image_size or default_size)
    vae = infer_vae_config(shapes, image_size=size)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "unet": infer_unet_config(shapes, image_size=size, vae_factor=factor),
        "vae": vae,
        "text_encoder": infer_text_config(shapes, kind),
        "scheduler": {**DEFAULT_SCHEDULER, "prediction_type": prediction_type or default_pred},
    }


def component_views(tensors: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]]) -> dict[str, RenamedView]:
    """The file's tensors as three diffusers-named views: ``unet``, ``vae``, ``text_encoder``."""
    keys = list(tensors.keys())
    kind = text_encoder_kind(keys)
    unet_cfg = configs["unet"]
    layers = unet_cfg.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block is not an original Stable Diffusion layout")
    if kind == "clip":
        text = clip_plan(keys)
    else:
        text = open_clip_plan(keys, int(configs["text_encoder"].get("num_hidden_layers", open_clip_layers(keys) - 1)))
    return {"unet": RenamedView(tensors, unet_plan(keys, layers)), "vae": RenamedView(tensors, vae_plan(keys)),
            "text_encoder": RenamedView(tensors, text)}


# ---------------------------------------------------------------------------------------------
# Loading.

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


@dataclass(frozen=True)
class LDMNetworks:
    """The networks of an original single-file checkpoint, with the configs they were built from."""

    unet: Any
    vae: Any
    text_encoder: Any
    configs: Mapping[str, Mapping[str, Any]]
    text_kind: str          # "clip" (SD 1.x) or "open_clip" (SD 2.x)
    config_folder: Any = None  # the diffusers folder given as config, if any (its tokenizer/ is used)


def resolve_configs(shapes: Mapping[str, tuple[int, ...]], config: Any = None, *, prediction_type: str | None = None,
                    image_size: int | None = None) -> tuple[dict[str, dict[str, Any]], Any]:
    """The component configs for a file: inferred from ``shapes``, then replaced by those ``config`` gives.

    ``config``: None; a diffusers Stable Diffusion folder (its ``unet/``, ``vae/``, ``text_encoder/`` and
    ``scheduler/`` configs, each used where present); a JSON file or dict with any of the keys ``unet``,
    ``vae``, ``text_encoder``, ``scheduler`` (whole configs) and ``prediction_type``, ``image_size``.
    Explicit ``prediction_type`` / ``image_size`` arguments win over everything. Returns (configs, folder).
    """
    import os
    from pathlib import Path

    folder = None
    given: dict[str, Any] = {}
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            folder = path
            for name in COMPONENTS:
                fname = "scheduler_config.json" if name == "scheduler" else "config.json"
                if (path / name / fname).is_file():
                    given[name] = _read_json(path / name / fname)
            if not given:
                raise ValueError(f"config folder {path} holds none of unet/, vae/, text_encoder/, scheduler/ configs; "
                                 "give a diffusers Stable Diffusion folder or a JSON file")
        else:
            given = _read_json(path)
    elif isinstance(config, Mapping):
        given = dict(config)
    elif config is not None:
        raise TypeError(f"config must be a folder, a JSON file or a dict, got {type(config).__name__}")
    unknown = set(given) - set(COMPONENTS) - {"prediction_type", "image_size"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; use {', '.join(COMPONENTS)}, prediction_type, image_size")
    pred = prediction_type or given.get("prediction_type")
    size = image_size or given.get("image_size")
    configs = infer_configs(shapes, prediction_type=pred, image_size=size)
    for name in COMPONENTS:
        if isinstance(given.get(name), Mapping):
            configs[name] = dict(given[name])
    if pred is not None:
        configs["scheduler"] = {**configs["scheduler"], "prediction_type": pred}
    if size is not None:  # the default image size: U-Net sample_size in latents, VAE sample_size in pixels
        factor = 2 ** (len(configs["vae"].get("block_out_channels", (0,) * 4)) - 1)
        configs["unet"] = {**configs["unet"], "sample_size": int(size) // factor}
        configs["vae"] = {**configs["vae"], "sample_size": int(size)}
    return configs, folder


def load_ldm_checkpoint(path: Any, config: Any = None, *, prediction_type: str | None = None,
                        image_size: int | None = None, dtype: Any = None) -> LDMNetworks:
    """Load the U-Net, VAE and text encoder of an original SD 1.x / 2.x single ``.safetensors`` file.

    Configs are inferred from the tensor shapes unless ``config`` gives them (see :func:`resolve_configs`);
    pickle files (``.ckpt``) are refused with the way to convert them. ``dtype`` (default float32) is the
    parameter and compute dtype.
    """
    from pathlib import Path

    import jax.numpy as jnp

    from jaxdiff.convert.folders import build_network, network_class
    from jaxdiff.convert.safetensors_io import open_safetensors, refuse_pickle

    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open_safetensors(path) as tensors:
        if not is_ldm_layout(tensors.keys()):
            raise ValueError(f"{path} is not an original Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors); "
                             "for one network in diffusers layout use jaxdiff.convert.load_single_file")
        configs, folder = resolve_configs(tensors.shapes, config, prediction_type=prediction_type, image_size=image_size)
        views = component_views(tensors, configs)
        kind = text_encoder_kind(tensors.keys())
        nets = {}
        for name, cls_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"),
                               ("text_encoder", "CLIPTextModel")):
            try:
                nets[name] = build_network(network_class(cls_name), configs[name], views[name],
                                           dtype=dtype or jnp.float32)
            except ValueError as e:
                raise type(e)(f"{path}: the {name} does not fit its config ({e}); pass config= the model's diffusers "
                              "folder or its configs") from None
    return LDMNetworks(nets["unet"], nets["vae"], nets["text_encoder"], configs, kind, folder)


def single_file_tokenizer(kind: str, folder: Any = None, max_length: int = 77) -> Any:
    """The tokenizer for a single file, which ships none: ``folder/tokenizer`` when a diffusers folder was given as
    config, else OpenAI CLIP's BPE tokenizer built offline from the vocabulary jaxdiff ships (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``,
    as their diffusers folders do)."""
    from pathlib import Path

    from jaxdiff.models import tokenizers

    if folder is not None and (Path(folder) / "tokenizer").is_dir():
        return tokenizers.load_tokenizer(Path(folder) / "tokenizer")
    from transformers import CLIPTokenizer

    merges = tokenizers.read_bpe_merges(tokenizers.CLIP_BPE)
    pad = {"pad_token": "!"} if kind == "open_clip" else {}
    return CLIPTokenizer(vocab=tokenizers.clip_vocab(merges), merges=merges, model_max_length=max_length, **pad)
