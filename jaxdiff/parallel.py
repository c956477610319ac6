"""Data-parallel sampling over a device mesh: ``jax.jit`` + ``NamedSharding``, ``jax.pmap``, ``jax.distributed``.

The batch of a :class:`jaxdiff.pipelines.stable_diffusion.Request` (token ids, seeds, scales, init images, start noise,
masks) is split along the mesh axis ``"data"``; the network parameters are replicated, or with ``fsdp``
their large arrays are split along the same axis (ZeRO-3 style; XLA gathers them where they are used).
A batch that does not divide the device count is padded by repeating its last entry and trimmed after.
Every image is drawn from its own seed (``jax.vmap`` inside the program), so the images do not depend on
the device count, the padding or the batch position.

On CPU the recipes do this by default (:func:`sampling_mesh`, :class:`ShardBatch`): jaxdiff makes one
CPU device per core (:mod:`jaxdiff.cpu_devices`) and splits each sampling call's classifier-free-guidance
batch over them: whole images along ``"data"`` and, when there are fewer images than devices, the
conditional and unconditional halves of each image's U-Net call along ``"cfg"`` (their guided
combination then gathers one latent per step between devices). Cost: the weights are replicated on every
device used, and the program compiles somewhat slower.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff._pytree import pytree_dataclass, static_field

DATA = "data"
CFG = "cfg"
BATCH_FIELDS = ("ids", "neg_ids", "seeds", "scale", "image", "mask", "noise")


def make_mesh(devices: Sequence[Any] | None = None, axis: str = DATA) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices, every host's under ``jax.distributed``).

    Axis types are ``Auto`` (sharding propagated by XLA), not ``jax.make_mesh``'s default ``Explicit``,
    so that unannotated intermediate values inside the sampling program need no sharding rules.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return jax.make_mesh((len(devices),), (axis,), axis_types=(AxisType.Auto,), devices=devices)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types (sharding propagated by the compiler).

    ``jax.make_mesh`` makes Explicit axes by default, under which every op must agree on its operands'
    shardings; a network mixing a data-sharded batch with replicated noise levels would not trace.
    Used for a mesh a caller hands in (the training step); the meshes made here are Auto already.
    """
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def auto_devices() -> list[Any]:
    """The devices the recipes split a sampling call over by default: every CPU device when the default
    backend is the CPU of a single process, else just the first device (no automatic splitting)."""
    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        return jax.devices()[:1]
    return jax.devices()


def mesh_shape(batch: int, devices: int, pair: int = 2) -> tuple[int, int]:
    """``(data, cfg)`` sizes of :func:`sampling_mesh` for ``batch`` images on ``devices`` devices."""
    if batch < 1 or devices < 1:
        raise ValueError(f"batch and device count must be at least 1, got {batch} and {devices}")
    return (devices, 1) if batch >= devices else (batch, max(1, min(pair, devices // batch)))


def sampling_mesh(batch: int, devices: Sequence[Any] | None = None, pair: int = 2) -> Mesh | None:
    """A 2-D ``(data, cfg)`` mesh for ``batch`` images whose denoiser evaluates ``pair`` inputs each (the
    CFG pair), or None when a single device would be used (default devices: :func:`auto_devices`).

    With at least as many images as devices the images are split (``data`` = devices, ``cfg`` = 1; the
    batch is padded to a multiple); with fewer, each image gets its own ``data`` slot and its CFG pair is
    split over ``cfg = min(pair, devices // batch)`` devices. So batch 1 on two cores runs the conditional
    and unconditional U-Net halves on one core each.
    """
    devices = list(auto_devices() if devices is None else devices)
    data, cfg = mesh_shape(batch, len(devices), pair)
    if data * cfg == 1:
        return None
    return jax.make_mesh((data, cfg), (DATA, CFG), axis_types=(AxisType.Auto,) * 2, devices=devices[:data * cfg])


def batch_mesh(batch: int, devices: Sequence[Any] | None = None) -> Mesh | None:
    """A 1-D ``data`` mesh over the most devices (of :func:`auto_devices`) that divide ``batch``; None for one."""
    devices = list(auto_devices() if devices is None else devices)
    n = max(d for d in range(1, min(len(devices), batch) + 1) if batch % d == 0)
    return None if n == 1 else make_mesh(devices[:n])


@pytree_dataclass
class ShardBatch:
    """Denoiser transform: the batch axis of ``x`` (and of ``sigma`` and the conditioning leaves with the same
    leading size) split over ``sharding`` (a ``NamedSharding`` whose spec names the batch axis), the output too.

    Wrap the network under a guidance transform (``ClassifierFree(ShardBatch(D, s), ...)``) to split the
    CFG-doubled batch across devices inside the compiled loop; under ``jax.vmap(..., spmd_axis_name=a)``
    the vmapped axis is split along mesh axis ``a`` as well. The batch must divide the axis size.
    """

    inner: Any
    sharding: NamedSharding = static_field()

    def _split(self, a: Any, size: int) -> Any:
        if isinstance(a, jax.Array) and a.ndim and a.shape[0] == size:
            return jax.lax.with_sharding_constraint(a, self.sharding)
        return a

    def __call__(self, x: jax.Array, sigma: jax.Array, cond: Any = None) -> jax.Array:
        n = x.shape[0]
        cond = jax.tree_util.tree_map(lambda a: self._split(a, n), cond)
        return self._split(self.inner(self._split(x, n), self._split(sigma, n), cond), n)


def param_sharding(x: Any, mesh: Mesh, fsdp: bool = False, min_size: int = 2**18, axis: str = DATA) -> NamedSharding:
    """Replicated; with ``fsdp`` an array of at least ``min_size`` elements is split along its largest
    dimension that the axis size divides (replicated when none does)."""
    n = mesh.shape[axis]
    shape = getattr(x, "shape", ())
    if fsdp and n > 1 and int(np.prod(shape, dtype=np.int64)) >= min_size:
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % n == 0:
                spec = [None] * len(shape)
                spec[d] = axis
                return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def shard_params(tree: Any, mesh: Mesh, *, fsdp: bool = False, min_size: int = 2**18) -> Any:
    """Place every array leaf of ``tree`` on the mesh (replicated, or FSDP-split; see :func:`param_sharding`)."""
    return jax.tree_util.tree_map(lambda x: _put(x, param_sharding(x, mesh, fsdp, min_size)), tree)


def _put(x: Any, sharding: NamedSharding) -> Any:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    if jax.process_count() > 1:  # every process holds the same full value: take this host's shards of it
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.device_put(x, sharding)


def pad_batch(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad the leading axis to a multiple of ``multiple`` by repeating the last entry."""
    n = x.shape[0]
    extra = -n % multiple
    return x if extra == 0 else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])


def shard_request(req: Any, mesh: Mesh, axis: str = DATA) -> tuple[Any, int]:
    """The request with its batch padded to the axis size and split along it; returns (request, true batch)."""
    n = int(req.seeds.shape[0])
    size = mesh.shape[axis]
    changes = {}
    for f in dataclasses.fields(req):
        v = getattr(req, f.name)
        if v is None:
            continue
        if f.name in BATCH_FIELDS:
            arr = pad_batch(np.asarray(v), size)
            changes[f.name] = _put(arr, NamedSharding(mesh, P(axis, *([None] * (arr.ndim - 1)))))
        else:
            changes[f.name] = jax.tree_util.tree_map(lambda a: _put(np.asarray(a), NamedSharding(mesh, P())), v)
    return dataclasses.replace(req, **changes), n


def gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) sharded array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(sd: Any, prompt: Any, *, mesh: Mesh | None = None, fsdp: bool = False, fsdp_min_size: int = 2**18,
             transform: Any = None, **kwargs: Any) -> np.ndarray:
    """``sd(prompt, **kwargs)`` data parallel on ``mesh`` (default: all devices); images (B, H, W, 3) in [0, 1]."""
    from jaxdiff.guidance import chain
    from jaxdiff.pipelines.stable_diffusion import generate_jit

    mesh = make_mesh() if mesh is None else mesh
    req, plan, static = sd.request(prompt, **kwargs)
    req, n = shard_request(req, mesh)
    models = shard_params(sd.models, mesh, fsdp=fsdp, min_size=fsdp_min_size)
    transform = chain(plan.threshold, transform)
    out = generate_jit(models, plan.sampler, req, transform, progress=False, **static)
    return gather(out)[:n]


def pmap_generate(sd: Any, prompt: Any, *, devices: Sequence[Any] | None = None, transform: Any = None,
                  **kwargs: Any) -> np.ndarray:
    """The same program under ``jax.pmap``: the padded batch is reshaped to (devices, per device, ...)."""
    from jaxdiff.guidance import chain
    from jaxdiff.pipelines.stable_diffusion import generate

    devices = list(jax.local_devices() if devices is None else devices)
    nd = len(devices)
    req, plan, static = sd.request(prompt, **kwargs)
    n = int(req.seeds.shape[0])
    axes, changes = {}, {}
    for f in dataclasses.fields(req):
        v = getattr(req, f.name)
        if f.name in BATCH_FIELDS and v is not None:
            arr = pad_batch(np.asarray(v), nd)
            changes[f.name] = arr.reshape((nd, arr.shape[0] // nd) + arr.shape[1:])
            axes[f.name] = 0
        else:
            axes[f.name] = None
    req = dataclasses.replace(req, **changes)
    in_axes = (None, None, type(req)(**axes), None)
    transform = chain(plan.threshold, transform)

    def run(models: Any, sampler: Any, r: Any, t: Any) -> jax.Array:
        return generate(models, sampler, r, t, progress=False, **static)

    out = jax.pmap(run, in_axes=in_axes, devices=devices)(sd.models, plan.sampler, req, transform)
    out = np.asarray(out)
    return out.reshape((-1,) + out.shape[2:])[:n]


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> None:
    """``jax.distributed.initialize`` (arguments from the cluster environment when omitted); on CPU the
    collectives go through gloo. Call before any other JAX work in every process."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by the CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               **kwargs)
