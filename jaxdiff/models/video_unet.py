"""A class-conditional video U-Net: the space-time factorised 3-D U-Net reading its class through cross-attention.

Ho et al. 2022 ("Video Diffusion Models") condition on text through the U-Net's attention; here the "text" of a
class is a learned token per class (``class_embedding``, rows ``0 .. num_classes - 1``, plus the null class
``num_classes`` for classifier-free guidance, Ho & Salimans 2022), handed to
:class:`~jaxdiff.models.unet3d.UNet3DConditionModel` as its ``encoder_hidden_states`` (B, 1, D).

``temporal=False`` runs every frame as an independent image (the temporal layers skipped): the paper's joint
image-video training "masks" temporal attention for the image frames (Sec. 3; :mod:`jaxdiff.train.video`).
Parameter names: ``class_embedding.weight`` and ``unet.<diffusers UNet3DConditionModel names>``.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.unet3d import UNet3DConditionConfig, UNet3DConditionModel

Array = jax.Array


@dataclass(frozen=True)
class ClassVideoUNetConfig:
    """``unet`` (a :class:`UNet3DConditionConfig` as a dict) and ``num_classes``; the null label is ``num_classes``."""

    unet: Mapping[str, Any]
    num_classes: int = 10

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassVideoUNetConfig":
        if "unet" not in d:
            raise ValueError("a ClassVideoUNet config needs a 'unet' entry (a UNet3DConditionModel config dict)")
        cfg = cls(unet=dict(d["unet"]), num_classes=int(d.get("num_classes", 10)))
        cfg.unet_config()  # validate
        return cfg

    def unet_config(self) -> UNet3DConditionConfig:
        return UNet3DConditionConfig.from_dict(self.unet)

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "ClassVideoUNet", "unet": self.unet_config().to_dict(), "num_classes": self.num_classes}

    @property
    def null_label(self) -> int:
        return self.num_classes


class ClassVideoUNet(nnx.Module):
    """``net(x, t, labels, temporal=True)``: (B, F, H, W, C) videos, timesteps, (B,) int labels -> (B, F, H, W, C)."""

    def __init__(self, config: ClassVideoUNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        ucfg = config.unet_config()
        self.class_embedding = nnx.Embed(config.num_classes + 1, ucfg.cross_attention_dim, rngs=rngs,
                                         embedding_init=nnx.initializers.normal(1.0))
        self.unet = UNet3DConditionModel(ucfg, rngs=rngs)

    def __call__(self, x: Array, timesteps: Any, labels: Array, *, temporal: bool = True) -> Array:
        labels = jnp.asarray(labels)
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be (B,) integers 0..{self.config.num_classes} ({self.config.num_classes}: "
                             f"no label), got {labels.dtype} {labels.shape}")
        context = self.class_embedding(labels)[:, None, :]
        return self.unet(x, timesteps, context, temporal=temporal)


def replace_unet(config: ClassVideoUNetConfig, **changes: Any) -> ClassVideoUNetConfig:
    """The config with ``unet`` keys changed (e.g. ``temporal_relative_positions=None`` for an ablation)."""
    return dataclasses.replace(config, unet={**config.unet, **changes})
