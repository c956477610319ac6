"""Original (lllyasviel's ``cldm``) single-file ControlNet checkpoints, read as diffusers' ``ControlNetModel``.

``control_sd15_*.safetensors`` / ``control_v11*.safetensors`` hold the ControlNet under its training-code
names, with or without the ``control_model.`` prefix (files that bundle a whole SD model keep theirs under
``model.diffusion_model.``, ignored here):

- ``time_embed``, ``input_blocks``, ``middle_block``, ``label_emb``: the copy of the U-Net's encoder, named as
  in the SD U-Net, renamed with :mod:`jaxdiff.convert.ldm`'s U-Net rules;
- ``input_hint_block.{0, 2, ..., 2K}``: the control-image encoder, a ``Sequential`` of convolutions with a
  SiLU between each, -> ``controlnet_cond_embedding.conv_in``, ``.blocks.{0..K-2}``, ``.conv_out``;
- ``zero_convs.N.0`` -> ``controlnet_down_blocks.N``; ``middle_block_out.0`` -> ``controlnet_mid_block``.

The config is read from the tensor shapes as :func:`jaxdiff.convert.ldm.infer_encoder_config` does for the U-Net
(heads by the same SD 1.x / 2.x rule); ``conditioning_channels`` and ``conditioning_embedding_out_channels``
from ``input_hint_block``. Not in the weights: ``global_pool_conditions`` (True only for the ``shuffle``
ControlNet) and other head counts: give the model's diffusers ``config.json`` for those.
This is the layout diffusers' ``convert_controlnet_checkpoint`` (``from_single_file``) reads.
"""
from __future__ import annotations

from collections.abc import Mapping
import os
from pathlib import Path
import re
from typing import Any

from jaxdiff.convert.ldm import (
    SD1_HEADS,
    SD2_HEAD_CHANNELS,
    RenamedView,
    Source,
    _indices,
    _unet_name,
    infer_encoder_config,
    unet_layout,
)

CONTROL_PREFIX = "control_model."
HINT = "input_hint_block."
ZERO_CONV = re.compile(r"zero_convs\.(\d+)\.0\.(.*)")
MID_OUT = "middle_block_out.0."
ENCODER_PARTS = ("time_embed.", "input_blocks.", "middle_block.", "label_emb.")


def controlnet_prefix(keys: Any) -> str:
    """``"control_model."`` or ``""``: where the ControlNet's tensors are; a ValueError when there is none."""
    keys = list(keys)
    if any(k.startswith(CONTROL_PREFIX + HINT) for k in keys):
        return CONTROL_PREFIX
    if any(k.startswith(HINT) for k in keys):
        return ""
    raise ValueError("not an original ControlNet checkpoint (no input_hint_block.* or control_model.input_hint_block.* "
                     "tensors); for a diffusers ControlNet give its folder (config.json + safetensors)")


def is_controlnet_layout(keys: Any) -> bool:
    """True when the tensor names are lllyasviel's ControlNet layout (with or without ``control_model.``)."""
    try:
        controlnet_prefix(keys)
    except ValueError:
        return False
    return True


def _short(keys: Any) -> dict[str, str]:
    """Prefix-free ControlNet name -> full key (a prefixed file's other tensors, e.g. a bundled SD model, dropped)."""
    keys = list(keys)
    prefix = controlnet_prefix(keys)
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def hint_convs(names: Any) -> list[int]:
    """The ``input_hint_block`` indices holding convolutions (0, 2, ..., 2K: SiLUs sit between them)."""
    return _indices(names, re.escape(HINT) + r"(\d+)\.weight$")


def _controlnet_name(name: str, hint: list[int], per: int) -> str:
    if name.startswith(HINT):
        index, rest = name[len(HINT):].split(".", 1)
        pos = hint.index(int(index))
        part = "conv_in" if pos == 0 else "conv_out" if pos == len(hint) - 1 else f"blocks.{pos - 1}"
        return f"controlnet_cond_embedding.{part}.{rest}"
    m = ZERO_CONV.match(name)
    if m:
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if name.startswith(MID_OUT):
        return f"controlnet_mid_block.{name[len(MID_OUT):]}"
    if name.startswith(ENCODER_PARTS):
        new = _unet_name(name, per)
        if new is not None:
            return new
    raise ValueError(f"unknown ControlNet tensor {name!r}")


def controlnet_plan(keys: Any, layers_per_block: int | None = None) -> dict[str, Source]:
    """diffusers ``ControlNetModel`` name -> original key, for every ControlNet tensor of the file."""
    short = _short(keys)
    hint = hint_convs(short)
    per = (layers_per_block if layers_per_block is not None else unet_layout(short)["layers"]) + 1
    return {_controlnet_name(name, hint, per): Source(full) for name, full in short.items()}


def infer_controlnet_config(shapes: Mapping[str, tuple[int, ...]], *, linear_heads: int = SD2_HEAD_CHANNELS,
                            conv_heads: int = SD1_HEADS) -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` config read from the tensor shapes (see the module doc)."""
    s = {short: tuple(shapes[full]) for short, full in _short(shapes).items()}
    hint = hint_convs(s)
    outs = [s[f"{HINT}{i}.weight"][0] for i in hint]
    if len(hint) < 2 or len(hint) % 2:
        raise ValueError(f"cannot read the control-image encoder: {len(hint)} input_hint_block convolutions "
                         "(expected conv_in, two per downsampling level, conv_out)")
    return {"_class_name": "ControlNetModel",
            **infer_encoder_config(s, linear_heads=linear_heads, conv_heads=conv_heads),
            "conditioning_channels": s[f"{HINT}{hint[0]}.weight"][1],
            "conditioning_embedding_out_channels": [outs[0], *outs[2:-1:2]]}


def resolve_controlnet_config(shapes: Mapping[str, tuple[int, ...]], config: Any = None) -> dict[str, Any]:
    """The config for a file: ``config`` when given (a diffusers ControlNet folder, its ``config.json``, or a
    dict: used whole), else inferred from ``shapes``."""
    from jaxdiff.convert.folders import _read_json

    if config is None:
        return infer_controlnet_config(shapes)
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"ControlNet config {config} does not exist; give a diffusers ControlNet folder, "
                                    "its config.json, or a dict")
        return _read_json(path)
    raise TypeError(f"config must be a folder, a JSON file or a dict, got {type(config).__name__}")


def load_controlnet_checkpoint(path: str | os.PathLike, config: Any = None, *, dtype: Any = None) -> Any:
    """A :class:`jaxdiff.models.controlnet.ControlNetModel` from an original single ``.safetensors`` ControlNet.

    The config is inferred from the shapes unless ``config`` gives it (:func:`resolve_controlnet_config`);
    pickle files (``.ckpt``, ``.pth``) are refused with the way to convert them. ``dtype``: default float32.
    """
    import jax.numpy as jnp

    from jaxdiff.convert.folders import build_network, network_class
    from jaxdiff.convert.safetensors_io import open_safetensors, refuse_pickle

    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"ControlNet checkpoint {path} does not exist")
    with open_safetensors(path) as tensors:
        if not is_controlnet_layout(tensors.keys()):
            raise ValueError(f"{path} is not an original ControlNet checkpoint (no input_hint_block.* tensors); "
                             "for a diffusers ControlNet give its folder (config.json + safetensors)")
        cfg = resolve_controlnet_config(tensors.shapes, config)
        layers = cfg.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ValueError("per-block layers_per_block is not an original ControlNet layout")
        view = RenamedView(tensors, controlnet_plan(tensors.keys(), layers))
        try:
            return build_network(network_class("ControlNetModel"), cfg, view, dtype=dtype or jnp.float32)
        except ValueError as e:
            raise type(e)(f"{path}: the ControlNet does not fit its config ({e}); pass config= the model's diffusers "
                          "ControlNet folder or config.json") from None
