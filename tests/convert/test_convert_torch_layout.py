"""The generic PyTorch-layout filler: renames, ignores, dtype casts, random streams, early shape checks."""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert import CheckpointMismatchError, abstract, load_torch_tensors


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4, 3, rngs=rngs)
        self.conv = nnx.Conv(2, 5, (3,), rngs=rngs)  # 1-D conv: torch (out, in, k) -> (k, in, out)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # holds a random stream, which no checkpoint has
        self.table = nnx.Param(jnp.zeros((2,), jnp.int32))


def _tensors(rng=np.random.default_rng(0)) -> dict[str, np.ndarray]:
    return {
        "proj.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "proj.bias": rng.standard_normal((3,)).astype(np.float32),
        "conv.weight": rng.standard_normal((5, 2, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal((5,)).astype(np.float32),
        "table": np.array([7, 9], np.int32),
    }


class Recording(Mapping):
    """A lazy mapping that records which tensors were read."""

    def __init__(self, tensors):
        self.tensors, self.read = tensors, []
        self.shapes = {k: v.shape for k, v in tensors.items()}

    def __getitem__(self, k):
        self.read.append(k)
        return self.tensors[k]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def test_fill_layouts_and_random_stream():
    t = _tensors()
    net = load_torch_tensors(abstract(lambda: Net(nnx.Rngs(0))), t)
    np.testing.assert_array_equal(net.proj.kernel.get_value(), t["proj.weight"].T)
    np.testing.assert_array_equal(net.conv.kernel.get_value(), t["conv.weight"].transpose(2, 1, 0))
    x = np.ones((1, 6, 2), np.float32)
    ref = np.stack([sum(x[0, i + j] @ t["conv.weight"][:, :, j].T for j in range(3)) for i in range(4)]) + t["conv.bias"]
    np.testing.assert_allclose(nnx.Conv.__call__(net.conv, x)[0, 1:5], ref, rtol=1e-5)  # SAME padding: interior
    out = net.drop(jnp.ones((1000,)), deterministic=False)  # the stream is concrete and usable
    assert 300 < int((out == 0).sum()) < 700


def test_dtype_casts_floats_only():
    net = load_torch_tensors(abstract(lambda: Net(nnx.Rngs(0))), _tensors(), dtype=jnp.bfloat16)
    assert net.proj.kernel.get_value().dtype == jnp.bfloat16
    assert net.table.get_value().dtype == jnp.int32
    np.testing.assert_array_equal(net.table.get_value(), [7, 9])


def test_rename_and_ignore():
    t = {("old_" + k if k.startswith("proj") else k): v for k, v in _tensors().items()}
    t["conv.position_ids"] = np.arange(3)
    net = load_torch_tensors(abstract(lambda: Net(nnx.Rngs(0))), t,
                             rename=lambda k: k.removeprefix("old_"), ignore=[r"position_ids$"])
    np.testing.assert_array_equal(net.proj.bias.get_value(), t["old_proj.bias"])
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in checkpoint \(1\): conv.position_ids"):
        load_torch_tensors(abstract(lambda: Net(nnx.Rngs(0))), t, rename=lambda k: k.removeprefix("old_"))


def test_shape_mismatch_found_before_reading_any_tensor():
    t = _tensors()
    t["conv.weight"] = np.zeros((5, 2, 4), np.float32)
    del t["proj.bias"]
    lazy = Recording(t)
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_tensors(abstract(lambda: Net(nnx.Rngs(0))), lazy)
    assert "missing from checkpoint (1): proj.bias" in str(err.value)
    assert "conv.weight: checkpoint (5, 2, 4), model expects (3, 2, 5)" in str(err.value)
    assert lazy.read == []  # nothing was converted
