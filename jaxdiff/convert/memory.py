"""Peak resident memory of a call, for checking that checkpoint loading holds no second copy."""
from __future__ import annotations

from collections.abc import Callable
import gc
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{_STATUS} has no {field} field")


def peak_rss_during(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, int]:
    """Run ``fn`` and return ``(result, peak resident bytes above the resident size at the start)``.

    Linux only: resets the kernel's high-water mark (``VmHWM``) by writing 5 to
    ``/proc/self/clear_refs``, so the peak is exact, not sampled.
    """
    if not (_STATUS.exists() and _CLEAR_REFS.exists()):
        raise RuntimeError("peak_rss_during needs Linux /proc (VmHWM and clear_refs)")
    gc.collect()
    _CLEAR_REFS.write_text("5")
    start = _status_bytes("VmRSS")
    result = fn(*args, **kwargs)
    return result, max(0, _status_bytes("VmHWM") - start)
