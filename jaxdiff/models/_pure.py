"""The pure boundary between Flax NNX modules and jaxdiff's functional core.

`PureModel` holds an NNX graph definition (static) and its state (a pytree of arrays). Calling it
merges the two inside the trace, so a jitted sampler traces the parameters as inputs instead of
baking them in, and swapping weights (LoRA, fine-tunes) never recompiles.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from jaxdiff._pytree import pytree_dataclass, static_field


@pytree_dataclass
class PureModel:
    """A pytree callable: ``PureModel.of(module)(*args)`` equals ``module(*args)``."""

    state: Any
    graphdef: Any = static_field()
    method: str = static_field(default="__call__")

    @classmethod
    def of(cls, module: nnx.Module, method: str = "__call__") -> "PureModel":
        graphdef, state = nnx.split(module)
        return cls(state=state, graphdef=graphdef, method=method)

    def module(self) -> nnx.Module:
        """The NNX module these arrays describe (a fresh object sharing the arrays)."""
        return nnx.merge(self.graphdef, self.state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module(), self.method)(*args, **kwargs)

    def bind(self, method: str) -> "PureModel":
        """The same weights, calling another method (``encode``, ``decode``...)."""
        return PureModel(state=self.state, graphdef=self.graphdef, method=method)
