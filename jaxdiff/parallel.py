"""Data-parallel sampling over a device mesh: ``jax.jit`` + ``NamedSharding``, ``jax.pmap``, ``jax.distributed``.

Any request pytree is split along the mesh axis ``"data"`` on its batch axes: those its dataclass declares
(:func:`batch_field`; :class:`jaxdiff.pipelines.stable_diffusion.Request` declares its token ids, seeds, scales,
init images, masks and start noise), or an explicit prefix tree of axes (``None`` = replicated). The network
parameters are replicated, or with ``fsdp`` their large arrays are split along the same axis (ZeRO-3 style;
XLA gathers them where they are used). A batch that does not divide the device count is padded by repeating its
last entry and trimmed after. Every image is drawn from its own seed (``jax.vmap`` inside the program), so the
images do not depend on the device count, the padding or the batch position.

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


def pad_batch(x: np.ndarray, multiple: int, axis: int = 0) -> np.ndarray:
    """Pad ``axis`` to a multiple of ``multiple`` by repeating the last entry."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    last = np.take(x, [-1], axis=axis)
    return np.concatenate([x, np.repeat(last, extra, axis=axis)], axis=axis)


# ---- batch axes of request pytrees -----------------------------------------------------------------

BATCH_AXIS = "batch_axis"


def batch_field(axis: int = 0, **kwargs: Any) -> Any:
    """A dataclass field batched along ``axis`` (every array leaf under it): :func:`batch_axes` reads it, so
    :func:`shard_request` and :func:`split_for_pmap` split it over devices. Other fields are replicated."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[BATCH_AXIS] = axis
    return dataclasses.field(metadata=metadata, **kwargs)


def _one_level(tree: Any) -> tuple[list, Any]:
    """The direct children of a pytree node with their keys, and the node's tree definition one level deep."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda n: n is not tree)


def batch_axes(tree: Any) -> Any:
    """The prefix tree of batch axes a dataclass request declares (:func:`batch_field`; ``None`` = replicated):
    the request's own node with an int or ``None`` for each child field."""
    if not dataclasses.is_dataclass(tree):
        raise TypeError(f"{type(tree).__name__} declares no batch axes; pass axes= (a prefix tree of ints / None), "
                        "or declare its batched fields with jaxdiff.parallel.batch_field()")
    declared = {f.name: f.metadata.get(BATCH_AXIS) for f in dataclasses.fields(tree)}
    children, treedef = _one_level(tree)
    if treedef.num_leaves == 1 and not children[0][0]:
        raise TypeError(f"{type(tree).__name__} is not a registered pytree; decorate it with "
                        "jaxdiff.pytree_dataclass (or pass a pytree)")
    return treedef.unflatten([declared[path[0].name] for path, _ in children])


def _subtrees(tree: Any, axes: Any) -> list[tuple[int | None, Any]]:
    """(batch axis, subtree of ``tree``) for each leaf of the prefix tree ``axes`` (``None``: replicated)."""
    leaves, treedef = jax.tree_util.tree_flatten(axes, is_leaf=lambda n: n is None)
    return list(zip(leaves, treedef.flatten_up_to(tree)))


def batch_size(tree: Any, axes: Any = None) -> int:
    """The common size of the batched leaves' batch axes (one clear error when they disagree)."""
    axes = batch_axes(tree) if axes is None else axes
    batched = [(a, x) for a, sub in _subtrees(tree, axes) if a is not None for x in jax.tree_util.tree_leaves(sub)]
    sizes = {np.shape(x)[a] for a, x in batched}
    if len(sizes) != 1:
        raise ValueError(f"the batched leaves must share one batch size, got sizes {sorted(sizes) or 'none'}; "
                         "check the request's batch axes (axes=)")
    return sizes.pop()


def _map_batched(fn: Any, tree: Any, axes: Any) -> Any:
    """``fn(leaf, axis)`` on every leaf (``axis`` None for replicated leaves), keeping the tree's structure."""
    return jax.tree_util.tree_map(lambda a, sub: jax.tree_util.tree_map(lambda x: fn(x, a), sub), axes, tree,
                                  is_leaf=lambda n: n is None)


def shard_request(req: Any, mesh: Mesh, axis: str = DATA, axes: Any = None) -> tuple[Any, int]:
    """Any request pytree with its batched leaves padded to the mesh axis size and split along it, the others
    replicated; returns (request, true batch). ``axes``: a prefix tree of batch axes (int, or ``None`` =
    replicated), by default the request's declared ones (:func:`batch_axes`)."""
    axes = batch_axes(req) if axes is None else axes
    n, size = batch_size(req, axes), mesh.shape[axis]

    def put(x: Any, a: int | None) -> Any:
        if a is None:
            return _put(np.asarray(x), NamedSharding(mesh, P()))
        x = pad_batch(np.asarray(x), size, a)
        return _put(x, NamedSharding(mesh, P(*([None] * a), axis)))

    return _map_batched(put, req, axes), n


def split_for_pmap(req: Any, devices: int, axes: Any = None) -> tuple[Any, Any, int]:
    """For ``jax.pmap``: each batched leaf padded and its batch axis ``a`` split into (devices, per device) at ``a``.
    Returns (request, ``in_axes`` prefix tree for that argument, true batch)."""
    axes = batch_axes(req) if axes is None else axes
    n = batch_size(req, axes)

    def split(x: Any, a: int | None) -> Any:
        if a is None:
            return x
        x = pad_batch(np.asarray(x), devices, a)
        return x.reshape(x.shape[:a] + (devices, x.shape[a] // devices) + x.shape[a + 1:])

    return _map_batched(split, req, axes), axes, n


def gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) sharded array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(sd: Any, prompt: Any, *, mesh: Mesh | None = None, fsdp: bool = False, fsdp_min_size: int = 2**18,
             transform: Any = None, network_transform: Any = None, **kwargs: Any) -> np.ndarray:
    """``sd(prompt, **kwargs)`` data parallel on ``mesh`` (default: all devices); images (B, H, W, 3) in [0, 1]."""
    from jaxdiff.guidance import chain
    from jaxdiff.pipelines.stable_diffusion import generate_jit

    mesh = make_mesh() if mesh is None else mesh
    req, plan, static = sd.request(prompt, **kwargs)
    req, n = shard_request(req, mesh)
    models = shard_params(sd.models, mesh, fsdp=fsdp, min_size=fsdp_min_size)
    transform = chain(plan.threshold, transform)
    out = generate_jit(models, plan.sampler, req, transform, network_transform, progress=False, **static)
    return gather(out)[:n]


def pmap_generate(sd: Any, prompt: Any, *, devices: Sequence[Any] | None = None, transform: Any = None,
                  network_transform: Any = None, **kwargs: Any) -> np.ndarray:
    """The same program under ``jax.pmap``: the padded batch is reshaped to (devices, per device, ...)."""
    from jaxdiff.guidance import chain
    from jaxdiff.pipelines.stable_diffusion import generate

    devices = list(jax.local_devices() if devices is None else devices)
    req, plan, static = sd.request(prompt, **kwargs)
    req, req_axes, n = split_for_pmap(req, len(devices))
    transform = chain(plan.threshold, transform)

    def run(models: Any, sampler: Any, r: Any, t: Any, nt: Any) -> jax.Array:
        return generate(models, sampler, r, t, nt, progress=False, **static)

    in_axes = (None, None, req_axes, None, None)
    out = np.asarray(jax.pmap(run, in_axes=in_axes, devices=devices)(sd.models, plan.sampler, req, transform,
                                                                    network_transform))
    return out.reshape((-1,) + out.shape[2:])[:n]


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> None:
    """``jax.distributed.initialize`` (arguments from the cluster environment when omitted); on CPU the
    collectives go through gloo. Call before any other JAX work in every process."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by the CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               **kwargs)
