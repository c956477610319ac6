"""Samplers: small pure ``init`` / ``step`` objects run by :func:`jaxdiff.sampling.sample`."""
from __future__ import annotations

from typing import Any, Callable

from jaxdiff.samplers._base import Sampler as Sampler
from jaxdiff.samplers._base import ancestral_split as ancestral_split
from jaxdiff.samplers.euler import DDIM as DDIM
from jaxdiff.samplers.euler import Euler as Euler
from jaxdiff.samplers.euler import EulerAncestral as EulerAncestral

SAMPLERS: dict[str, Callable[..., Any]] = {
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "ddim": DDIM,
}


def get_sampler(name: str, **options: Any) -> Any:
    """Build a sampler by name; an unknown name lists the valid ones."""
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}") from None
    return factory(**options)
