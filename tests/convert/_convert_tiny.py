"""A tiny NNX network with reference-style names, standing in for the real networks in loading tests.

Its PyTorch twin (``torch_twin``) has the same parameter names, so a checkpoint saved from the twin
must load into ``TinyNet`` and give the same outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class TinyNetConfig:
    in_channels: int = 3
    width: int = 8
    depth: int = 2
    vocab_size: int = 10

    @classmethod
    def from_dict(cls, d: dict) -> "TinyNetConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TinyNet(nnx.Module):
    IGNORED_TORCH_KEYS = (r"position_ids$",)

    def __init__(self, config: TinyNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c, kw = config, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = nnx.Conv(c.in_channels, c.width, (3, 3), padding=1, **kw)
        self.norm = nnx.GroupNorm(c.width, num_groups=2, epsilon=1e-5, **kw)
        self.embed = nnx.Embed(c.vocab_size, c.width, **kw)
        self.blocks = nnx.List([nnx.Linear(c.width, c.width, **kw) for _ in range(c.depth)])

    def __call__(self, x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        """x: NHWC image, ids: (N,) token ids -> (N, width)."""
        h = self.norm(self.conv_in(x)).mean(axis=(1, 2)) + self.embed(ids)
        for block in self.blocks:
            h = jnp.tanh(block(h))
        return h


def torch_layout_tensors(config: TinyNetConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random tensors with TinyNet's PyTorch names and layouts (plus an ignored integer buffer)."""
    c, rng = config, np.random.default_rng(seed)
    t = {
        "conv_in.weight": rng.standard_normal((c.width, c.in_channels, 3, 3)),
        "conv_in.bias": rng.standard_normal((c.width,)),
        "norm.weight": rng.standard_normal((c.width,)),
        "norm.bias": rng.standard_normal((c.width,)),
        "embed.weight": rng.standard_normal((c.vocab_size, c.width)),
        "position_ids": np.arange(4, dtype=np.int64)[None],
    }
    for i in range(c.depth):
        t[f"blocks.{i}.weight"] = rng.standard_normal((c.width, c.width))
        t[f"blocks.{i}.bias"] = rng.standard_normal((c.width,))
    return {k: v if v.dtype == np.int64 else v.astype(dtype) for k, v in t.items()}


def torch_twin(config: TinyNetConfig):
    """The same network in PyTorch (NCHW), for output parity."""
    import torch

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c = config
            self.conv_in = torch.nn.Conv2d(c.in_channels, c.width, 3, padding=1)
            self.norm = torch.nn.GroupNorm(2, c.width, eps=1e-5)
            self.embed = torch.nn.Embedding(c.vocab_size, c.width)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(c.width, c.width) for _ in range(c.depth)])
            self.register_buffer("position_ids", torch.arange(4)[None])

        def forward(self, x, ids):
            h = self.norm(self.conv_in(x)).mean(dim=(2, 3)) + self.embed(ids)
            for block in self.blocks:
                h = torch.tanh(block(h))
            return h

    return Twin()


class TinyNetCustom(TinyNet):
    """Like the real networks: a classmethod builder with separate compute and storage dtypes."""

    @classmethod
    def from_pretrained_tensors(cls, config, tensors, *, dtype=jnp.float32, param_dtype=jnp.float32):
        from jaxdiff.convert import abstract, load_torch_tensors

        cfg = TinyNetConfig.from_dict(dict(config))
        module = abstract(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
        return load_torch_tensors(module, tensors, ignore=cls.IGNORED_TORCH_KEYS)
