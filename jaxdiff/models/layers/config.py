"""Model configs from reference ``config.json`` dicts: :func:`config_from_dict`, :func:`per_block`."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Build the frozen dataclass ``cls`` from a reference ``config.json`` dict.

    Unknown keys and keys starting with ``_`` are ignored; lists become tuples.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _freeze(v) for k, v in d.items() if k in names and not k.startswith("_")}
    return cls(**kwargs)


def per_block(value: Any, n: int, name: str) -> tuple:
    """An int/str/None broadcast to ``n`` blocks, or a length-``n`` sequence checked."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but the model has {n} blocks")
        return tuple(value)
    return (value,) * n
