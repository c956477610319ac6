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


def check_block_types(cfg: Any, field: str, supported: tuple[str, ...], model: str) -> None:
    """Raise a ValueError unless ``cfg.<field>`` (``down_block_types`` / ``up_block_types``) names one supported
    block per entry of ``cfg.block_out_channels``."""
    types = getattr(cfg, field)
    if len(types) != len(cfg.block_out_channels):
        raise ValueError(f"{field} and block_out_channels must have the same length")
    for t in types:
        if t not in supported:
            raise ValueError(f"unsupported {field.split('_')[0]} block {t!r}; {model} supports {supported}")
