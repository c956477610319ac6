"""Subprocess probe: peak resident memory of ``load_model_folder`` on a folder of Linear layers.

Usage: python _convert_memory_probe.py FOLDER DTYPE [--no-release]; prints one JSON line.
A fresh process keeps earlier allocations (which the allocator would reuse) out of the measurement.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert import NetworkSpec, load_model_folder
from jaxdiff.convert.memory import peak_rss_during
from jaxdiff.convert.safetensors_io import SafetensorsFile


@dataclass(frozen=True)
class StackConfig:
    layers: int
    width: int

    @classmethod
    def from_dict(cls, d: dict) -> "StackConfig":
        return cls(d["layers"], d["width"])


class Stack(nnx.Module):
    def __init__(self, config: StackConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.layers = nnx.List([nnx.Linear(config.width, config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.layers)])


def main() -> None:
    folder, dtype = sys.argv[1], jnp.dtype(sys.argv[2])
    if "--no-release" in sys.argv:
        SafetensorsFile.release = lambda self, name: None
    registry = {"Stack": NetworkSpec(__name__, "Stack")}
    jax.device_put(jnp.zeros(1))  # start the runtime before measuring
    filled, peak = peak_rss_during(load_model_folder, folder, dtype=dtype, registry=registry)
    leaves = jax.tree_util.tree_leaves(nnx.state(filled, nnx.Param))
    assert all(x.dtype == dtype for x in leaves)
    print(json.dumps({"peak": peak, "param_bytes": sum(x.nbytes for x in leaves)}))


if __name__ == "__main__":
    main()
