"""Frozen dataclasses that are JAX pytrees.

Fields are pytree children (traced under `jit`) unless declared with `static_field()`, which makes
them hashable metadata: changing a child never recompiles, changing a static field does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def static_field(**kwargs: Any) -> Any:
    """A dataclass field stored as static pytree metadata (must be hashable)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass registered as a pytree (children: non-static fields)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    meta = [f.name for f in fields if f.metadata.get("static", False)]
    data = [f.name for f in fields if not f.metadata.get("static", False)]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    return cls


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` for pytree dataclasses."""
    return dataclasses.replace(obj, **changes)
