"""Fill an abstract NNX module from tensors named and laid out as in PyTorch.

jaxdiff's networks mirror the attribute names of the diffusers / transformers modules they are
compatible with (``down_blocks.0.resnets.1.conv1``), so a single rule maps every checkpoint key onto
an NNX parameter path: the last name ``weight`` becomes ``kernel`` (Linear, Conv: transposed to
``(in, out)`` / ``(H, W, in, out)``), ``scale`` (norms) or ``embedding`` (Embed), and ``bias`` stays.
Models whose names differ pass a ``rename`` function for the few keys that need it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import contextvars
import re
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

_WEIGHT_ALIASES = ("kernel", "scale", "embedding")


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors do not fit the model: lists the missing, unexpected and mis-shaped names."""


def _torch_key(path: tuple[Any, ...]) -> tuple[str, str]:
    """NNX path -> (torch key, kind of parameter)."""
    *head, leaf = (str(p) for p in path)
    kind = leaf
    if leaf in _WEIGHT_ALIASES:
        leaf = "weight"
    return ".".join([*head, leaf]), kind


def torch_name_map(abstract_state: nnx.State) -> dict[str, tuple[tuple[Any, ...], str]]:
    """Torch key -> (NNX path, parameter kind) for every parameter of an abstract state."""
    out = {}
    for path, var in nnx.to_flat_state(abstract_state):
        if isinstance(var, nnx.RngState):  # random streams (dropout) are not checkpointed
            continue
        key, kind = _torch_key(path)
        out[key] = (path, kind)
    return out


def to_jax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor of the given parameter kind."""
    if kind != "kernel":
        return array
    if array.ndim == 2:  # Linear (out, in) -> (in, out)
        return array.T
    if array.ndim >= 3:  # Conv (out, in, *spatial) -> (*spatial, in, out)
        return np.transpose(array, (*range(2, array.ndim), 1, 0))
    return array


def to_torch_layout(array: Any, kind: str) -> Any:
    """Flax layout -> PyTorch layout (inverse of :func:`to_jax_layout`; numpy or jax arrays)."""
    if kind != "kernel" or array.ndim < 2:
        return array
    if array.ndim == 2:  # Linear (in, out) -> (out, in)
        return array.T
    n = array.ndim  # Conv (*spatial, in, out) -> (out, in, *spatial)
    return array.transpose((n - 1, n - 2, *range(n - 2)))


def state_name(path: tuple[Any, ...]) -> str:
    """An NNX state path as one dotted string (``down_blocks.0.resnets.0.conv1.kernel``)."""
    return ".".join(str(p) for p in path)


def checkpoint_name(path: tuple[Any, ...] | str) -> str:
    """The PyTorch checkpoint name of an NNX parameter path (or its :func:`state_name`):
    ``(..., "attn1", "to_q", "kernel")`` -> ``"....attn1.to_q.weight"``."""
    parts = tuple(path.split(".")) if isinstance(path, str) else path
    return _torch_key(parts)[0]


def parameter_kind(path: tuple[Any, ...] | str) -> str:
    """The last name of an NNX parameter path: ``kernel`` (transposed layouts), ``scale``, ``embedding``, ``bias``."""
    return str(path.split(".")[-1] if isinstance(path, str) else path[-1])


def state_path(name: str, state: nnx.State) -> tuple[Any, ...]:
    """Inverse of :func:`checkpoint_name` within ``state``: the NNX path holding checkpoint tensor ``name``.

    ``weight`` is ambiguous without the model (``kernel``, ``scale`` or ``embedding``), hence ``state``.
    Raises ``KeyError`` naming the tensor when the model has no such parameter."""
    found = torch_name_map(state).get(name)
    if found is None:
        raise KeyError(f"the model has no parameter named {name!r} (PyTorch naming, e.g. 'conv_in.weight')")
    return found[0]


def _summarise(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_torch_tensors(
    module: M,
    tensors: Mapping[str, Any],
    *,
    rename: Callable[[str], str | None] | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = None,
) -> M:
    """Return ``module`` (abstract or concrete) with its parameters taken from ``tensors``.

    ``tensors`` maps torch names to arrays (numpy, or anything ``np.asarray`` takes); it may be a
    lazy mapping that reads one tensor at a time, so no second full copy is held. ``rename`` maps a
    checkpoint key to the module's torch-style key (``None`` drops it); ``ignore`` holds regular
    expressions of checkpoint keys to skip (buffers such as ``position_ids``). ``dtype`` casts the
    floating parameters, one tensor at a time on the host (default: the module's own dtypes). Raises
    :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped tensor.
    """
    graphdef, state = nnx.split(module)
    name_map = torch_name_map(state)
    ignore_re = [re.compile(p) for p in ignore]
    flat = dict(nnx.to_flat_state(state))
    _fresh_rng_state(flat)

    plan: dict[tuple[Any, ...], tuple[str, str]] = {}
    unexpected, misshaped = [], []
    for ckpt_key in tensors.keys():
        if any(r.search(ckpt_key) for r in ignore_re):
            continue
        key = rename(ckpt_key) if rename is not None else ckpt_key
        if key is None:
            continue
        if key not in name_map:
            unexpected.append(ckpt_key)
            continue
        path, kind = name_map[key]
        plan[path] = (ckpt_key, kind)
    missing = [_torch_key(p)[0] for p, v in flat.items() if p not in plan and not isinstance(v, nnx.RngState)]

    # Shapes are checked before anything is converted, so a mismatch costs no memory.
    shapes = getattr(tensors, "shapes", None)
    for path, (ckpt_key, kind) in plan.items():
        target = tuple(flat[path].get_value().shape)
        if shapes is not None:
            shape = tuple(shapes[ckpt_key])
            if kind == "kernel":
                shape = shape[::-1] if len(shape) == 2 else (*shape[2:], shape[1], shape[0]) if len(shape) >= 3 else shape
            if shape != target:
                misshaped.append(f"{ckpt_key}: checkpoint {tuple(shapes[ckpt_key])}, model expects {target}")
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(_mismatch_message(missing, unexpected, misshaped))

    release = getattr(tensors, "release", None)
    for path, (ckpt_key, kind) in plan.items():
        var = flat[path]
        target = var.get_value()
        value = to_jax_layout(np.asarray(tensors[ckpt_key]), kind)
        if value.shape != tuple(target.shape):
            misshaped.append(f"{ckpt_key}: checkpoint {value.shape}, model expects {tuple(target.shape)}")
            continue
        var.set_value(_to_device(value, _fill_dtype(target.dtype, dtype)))
        if release is not None:  # a lazy reader may drop the pages it mapped for this tensor
            release(ckpt_key)
    if misshaped:
        raise CheckpointMismatchError(_mismatch_message([], [], misshaped))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fresh_rng_state(flat: dict[tuple[Any, ...], Any]) -> None:
    """Give abstract random-stream variables (dropout's ``rngs``) concrete values: key 0, count 0."""
    for var in flat.values():
        value = var.get_value()
        if not isinstance(var, nnx.RngState) or not isinstance(value, jax.ShapeDtypeStruct):
            continue
        if isinstance(var, nnx.RngKey):
            var.set_value(jnp.broadcast_to(jax.random.key(0), value.shape))
        else:
            var.set_value(jnp.zeros(value.shape, value.dtype))


def _fill_dtype(target: Any, dtype: Any) -> np.dtype:
    """The requested dtype for floating parameters; others (integer tables) keep their own."""
    target = np.dtype(target)
    if dtype is None or not jnp.issubdtype(target, jnp.floating):
        return target
    return np.dtype(dtype)


def _to_device(value: np.ndarray, dtype: np.dtype) -> jax.Array:
    """Cast on the host, one tensor at a time, then copy to the device (the host copy is freed)."""
    return jax.device_put(np.asarray(value, dtype=dtype))


def _mismatch_message(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    parts = ["checkpoint does not match the model configuration:"]
    if missing:
        parts.append(f"  missing from checkpoint ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        parts.append(f"  unexpected in checkpoint ({len(unexpected)}): {_summarise(unexpected)}")
    if misshaped:
        parts.append(f"  wrong shape ({len(misshaped)}): {_summarise(misshaped, 10)}")
    parts.append("  check that config.json belongs to these weights (same architecture and sizes).")
    return "\n".join(parts)


_SHAPES_ONLY = contextvars.ContextVar("jaxdiff_shapes_only", default=False)


def shapes_only() -> bool:
    """True while :func:`abstract` builds a module: initialisers may skip drawing random values,
    which would only be traced and thrown away (jaxdiff's own initialisers then trace one op)."""
    return _SHAPES_ONLY.get()


def abstract(ctor: Callable[[], M]) -> M:
    """Build a module without allocating its parameters (shapes and dtypes only).

    Traces ``ctor`` under ``nnx.eval_shape``. Networks should draw their per-layer keys from a
    Python counter (:class:`jaxdiff.models.layers.KeySource`), not from ``nnx.Rngs`` in every
    layer: each ``nnx.Rngs`` draw updates a traced counter, which costs a scan of the whole trace
    so far (flax 0.12 / jax 0.10), making the build quadratic in depth.
    """
    token = _SHAPES_ONLY.set(True)
    try:
        return nnx.eval_shape(ctor)
    finally:
        _SHAPES_ONLY.reset(token)


def build_from_tensors(model_class: Callable[..., M], config_class: Any, config: Any, tensors: Mapping[str, Any], *,
                       rename: Callable[[str], str | None] | None = None, ignore: Iterable[str] = (),
                       dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> M:
    """``model_class(config)`` built abstractly (:func:`abstract`) and filled from torch-named ``tensors``
    (:func:`load_torch_tensors`): what every model's ``from_pretrained_tensors`` does. ``config`` is a
    ``config.json`` dict (read by ``config_class.from_dict``) or a config already built."""
    cfg = config_class.from_dict(config) if isinstance(config, Mapping) else config
    module = abstract(lambda: model_class(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return load_torch_tensors(module, tensors, rename=rename, ignore=ignore, dtype=param_dtype)


def count_params(module: nnx.Module) -> int:
    """Number of parameters of a (possibly abstract) module."""
    state = nnx.state(module, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(state)))
