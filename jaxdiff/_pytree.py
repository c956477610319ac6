"""Frozen dataclasses that are JAX pytrees, with their class in the tree structure.

Fields are pytree children (traced under `jit`) unless declared with `static_field()`, which makes
them hashable metadata: changing a child never recompiles, changing a static field does.

Why not ``jax.tree_util.register_dataclass``: with jax 0.10 the tree structures it builds for two
*different* classes compare equal whenever they have the same number of data fields and equal
metadata (``tree_structure(Euler()) == tree_structure(UniPC())`` was True; flax.struct behaves the
same). Their hashes differ, so ``jax.jit`` usually keeps their programs apart, but not always: a
cache lookup that finds an equal structure runs the other class's compiled program, silently. Nodes
registered with ``register_pytree_with_keys`` compare their node type, so here no two classes ever
share a structure.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
from jax.tree_util import GetAttrKey

T = TypeVar("T")

CLASSES: list[type] = []
"""Every class made by :func:`pytree_dataclass`, in definition order (tests enumerate them)."""


def static_field(**kwargs: Any) -> Any:
    """A dataclass field stored as static pytree metadata (must be hashable); changing it recompiles."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass registered as a pytree whose structure includes the class itself.

    Children are the fields not declared with :func:`static_field`, keyed as ``GetAttrKey(name)``
    (``jax.tree_util.tree_flatten_with_path``); static fields form the (hashed, compared) aux data.
    Unlike ``jax.tree_util.register_dataclass`` (jax 0.10), whose structures for two different
    classes with the same number of data fields and equal metadata compare equal, so that a jit
    cache can run one class's compiled program for the other, the node type here takes part in
    equality: ``tree_structure(A(...)) != tree_structure(B(...))`` for any two decorated classes.
    A subclass is a distinct node only when decorated too. Unflattening (``tree_map``, ``jit``,
    ``vmap``) rebuilds the object without calling ``__init__``/``__post_init__``, so validation and
    option conversion there run only when user code constructs (or ``dataclasses.replace``-s) one.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(GetAttrKey(n) for n in data)

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        return [(k, getattr(obj, n)) for k, n in zip(keys, data)], tuple(getattr(obj, n) for n in meta)

    def flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(obj, n) for n in data], tuple(getattr(obj, n) for n in meta)

    def unflatten(aux: tuple[Any, ...], children: Any) -> Any:
        obj = object.__new__(cls)
        for n, v in zip(meta, aux):
            object.__setattr__(obj, n, v)
        for n, v in zip(data, children):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    CLASSES.append(cls)
    return cls


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` for pytree dataclasses (runs ``__post_init__`` like construction)."""
    return dataclasses.replace(obj, **changes)
