"""Shard non-SD request pytrees on their batch axes, on two devices: run by tests/_cpu_devices_worker.py (in its
two-device subprocess) and checked by tests/test_cpu_devices.py.

:func:`results` returns the sharded / pmapped results, their numpy references and the per-device shard shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff._pytree import pytree_dataclass, static_field

N = 5  # does not divide 2: padded, then trimmed


@pytree_dataclass
class Pairs:
    """A request batched along axis 1 of ``x`` (3, N), with a replicated weight and a static tag."""

    x: jax.Array = parallel.batch_field(axis=1)
    w: jax.Array = None
    tag: str = static_field(default="pairs")


def weighted(r: Pairs) -> jax.Array:
    return jnp.sum(r.x * r.w[:, None], axis=0)  # (N,)


def results() -> dict:
    """Shard a :class:`Pairs` request and a plain dict over every device (jit) and split them for ``jax.pmap``."""
    rng = np.random.default_rng(0)
    req = Pairs(rng.normal(size=(3, N)).astype(np.float32), np.array([1.0, -2.0, 0.5], np.float32))
    mesh = parallel.make_mesh()
    sharded, n = parallel.shard_request(req, mesh)
    res = {"devices": np.asarray(jax.device_count()), "n": np.asarray(n),
           "x_shard": np.asarray(sharded.x.addressable_shards[0].data.shape),
           "w_shard": np.asarray(sharded.w.addressable_shards[0].data.shape),
           "jit": np.asarray(jax.jit(weighted)(sharded))[:n], "ref": weighted(req)}
    split, axes, n = parallel.split_for_pmap(req, jax.device_count())
    out = jax.pmap(lambda r: weighted(r), in_axes=(axes,))(split)  # (devices, per device)
    res["pmap"] = np.asarray(out).reshape(-1)[:n]
    # a plain dict with an explicit prefix tree of axes (None = replicated)
    tree = {"a": rng.normal(size=(N, 2)).astype(np.float32), "b": rng.normal(size=(2, N)).astype(np.float32),
            "c": np.float32(3.0)}
    axes = {"a": 0, "b": 1, "c": None}
    st, n = parallel.shard_request(tree, mesh, axes=axes)
    res["dict"] = np.asarray(jax.jit(lambda t: t["a"].sum(1) * t["c"] + t["b"].sum(0))(st))[:n]
    res["dict_ref"] = tree["a"].sum(1) * tree["c"] + tree["b"].sum(0)
    res["dict_b_shard"] = np.asarray(st["b"].addressable_shards[0].data.shape)
    return res
