"""Subprocess probe: peak resident memory while filling a Linear stack from a lazy safetensors file.

Usage: python _convert_memory_probe.py FILE LAYERS WIDTH DTYPE [--no-release]; prints one JSON line.
A fresh process keeps earlier allocations (which the allocator would reuse) out of the measurement.
"""
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.memory import peak_rss_during
from jaxdiff.convert.safetensors_io import SafetensorsFile
from jaxdiff.convert.torch_layout import abstract, load_torch_tensors


class Stack(nnx.Module):
    def __init__(self, layers: int, width: int, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(width, width, param_dtype=dtype, rngs=rngs) for _ in range(layers)])


def main() -> None:
    path, layers, width, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), jnp.dtype(sys.argv[4])
    if "--no-release" in sys.argv:
        SafetensorsFile.release = lambda self, name: None
    module = abstract(lambda: Stack(layers, width, dtype, nnx.Rngs(0)))
    with SafetensorsFile(path) as tensors:
        filled, peak = peak_rss_during(load_torch_tensors, module, tensors)
    leaves = jax.tree_util.tree_leaves(nnx.state(filled, nnx.Param))
    assert all(x.dtype == dtype for x in leaves)
    print(json.dumps({"peak": peak, "param_bytes": sum(x.nbytes for x in leaves)}))


if __name__ == "__main__":
    main()
