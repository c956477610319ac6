"""Opt-in persistent compilation cache: a second process reuses the XLA programs the first one compiled.

``enable(path)`` (or the environment variable ``JAXDIFF_COMPILE_CACHE=path``, read by :func:`from_env`,
or the CLI's ``--compile-cache``) points JAX's cache at ``path`` and caches every program, however
small or quick to compile (JAX's defaults skip programs under one second of compile time).
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXDIFF_COMPILE_CACHE"


def enable(path: str | os.PathLike, *, min_compile_time_secs: float = 0.0, min_entry_size_bytes: int = 0) -> Path:
    """Cache compiled programs in ``path`` (created if needed); call before the first compilation."""
    import jax

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    return path


def from_env() -> Path | None:
    """Enable the cache at ``$JAXDIFF_COMPILE_CACHE`` when it is set (non-empty); the path or None."""
    value = os.environ.get(ENV, "").strip()
    return enable(value) if value else None
