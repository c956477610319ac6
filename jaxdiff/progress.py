"""Progress from inside compiled loops: a tqdm bar fed through ``jax.debug.callback``."""
from __future__ import annotations

from typing import Any

import jax

_bar: Any = None


def _update(i: Any, total: Any) -> None:
    global _bar
    from tqdm.auto import tqdm

    i, total = int(i), int(total)
    if i == 0 or _bar is None:
        if _bar is not None:
            _bar.close()
        _bar = tqdm(total=total, desc="sampling", unit="step", leave=False)
    _bar.update(1)
    if i + 1 >= total:
        _bar.close()
        _bar = None


def report(i: jax.Array, total: jax.Array) -> None:
    """Tell the host that step ``i`` of ``total`` finished (call inside a traced loop)."""
    jax.debug.callback(_update, i, total, ordered=True)
