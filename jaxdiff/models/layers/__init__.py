"""Building blocks shared by jaxdiff's networks (U-Nets, VAE, ControlNet, DiT, CLIP, T5).

Every block mirrors the attribute names of its diffusers counterpart (``ResnetBlock2D.norm1``,
``Attention.to_out[0]``, ``Transformer2DModel.proj_in``...), so PyTorch checkpoints load by name
(see :mod:`jaxdiff.convert.torch_layout`). Tensors are NHWC (channels last) throughout.

- :mod:`.make`: :class:`Maker`, the one way layers are built (keys, dtypes, PyTorch-default inits)
- :mod:`.norms`: ``GroupNorm`` with PyTorch statistics
- :mod:`.embeddings`: the sinusoidal timestep embedding, ``TimestepEmbedding``, ``TextTimeEmbedding``
- :mod:`.resnet`: ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``
- :mod:`.transformer`: ``Attention``, ``FeedForward``, ``BasicTransformerBlock``, ``Transformer2DModel``
- :mod:`.added_kv`: ``AddedKVAttention`` (GLIDE / unCLIP / DeepFloyd IF text-and-self attention)
- :mod:`.temporal`: ``TemporalConvLayer``, ``TransformerTemporalModel`` (video U-Nets), ``per_frame``
- :mod:`.blocks`: the U-Net stages ``DownBlock``, ``UpBlock``, ``MidBlock``
- :mod:`.config`: :func:`config_from_dict`, :func:`per_block`, :func:`check_block_types`
"""
from jaxdiff.models.layers.added_kv import AddedKVAttention, mask_bias
from jaxdiff.models.layers.blocks import DownBlock, MidBlock, UpBlock
from jaxdiff.models.layers.config import check_block_types, config_from_dict, per_block
from jaxdiff.models.layers.embeddings import (
    AttentionPooling,
    TextTimeEmbedding,
    TimestepEmbedding,
    batch_timesteps,
    timestep_embedding,
)
from jaxdiff.models.layers.make import ACTIVATIONS, Identity, KeySource, Maker, activation, torch_default_init
from jaxdiff.models.layers.norms import GroupNorm
from jaxdiff.models.layers.temporal import TemporalConvLayer, TransformerTemporalModel, per_frame
from jaxdiff.models.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D, upsample_nearest
from jaxdiff.models.layers.transformer import (
    GEGLU,
    Attention,
    BasicTransformerBlock,
    FeedForward,
    GELUProj,
    Transformer2DModel,
    spatial_attention,
)

__all__ = [
    "ACTIVATIONS", "AddedKVAttention", "AttentionPooling", "TextTimeEmbedding", "mask_bias",
    "Attention", "BasicTransformerBlock", "DownBlock", "Downsample2D", "FeedForward", "GEGLU",
    "GELUProj", "GroupNorm", "Identity", "KeySource", "Maker", "MidBlock", "ResnetBlock2D", "TemporalConvLayer",
    "TimestepEmbedding", "Transformer2DModel", "TransformerTemporalModel", "UpBlock", "Upsample2D", "activation",
    "batch_timesteps", "check_block_types", "config_from_dict", "per_block", "per_frame", "spatial_attention",
    "timestep_embedding", "torch_default_init", "upsample_nearest"
]
