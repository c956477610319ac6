"""The one composition algebra shared by both levels of transforms (DESIGN.md, "Seams inside the network").

A *transform* maps a callable to a callable of the same kind: a denoiser ``D(x, sigma, cond)`` to a
denoiser (:mod:`jaxdiff.guidance`), or a network ``net(x, t, cond)`` to a network
(:mod:`jaxdiff.conditioning`). Both kinds are pytree callables and compose with the same
:func:`chain` / :func:`apply`, as ``optax.chain`` composes gradient transformations.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field

Array = jax.Array


def float_leaf(v: Any) -> Array:
    """A numeric setting as a float32 array, so Python floats and arrays share one compiled program."""
    return jnp.asarray(v, jnp.float32)


def as_pytree_callable(fn: Any) -> Any:
    """Keep pytree callables as they are; wrap a plain function as static (``jax.tree_util.Partial``)."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(fn)):
        return jax.tree_util.Partial(fn)
    return fn


@pytree_dataclass
class Transform:
    """A callable -> callable map: ``Transform(cls, params)(inner) == cls(inner, **params, **static)``.

    ``params`` (a dict of leaves: scales, labels, conditioning, pytree callables) are children;
    ``static`` holds hashable options as ``(name, value)`` pairs.
    """

    cls: type = static_field()
    params: dict
    static: tuple = static_field(default=())

    def __call__(self, inner: Any) -> Any:
        return self.cls(inner, **self.params, **dict(self.static))


@pytree_dataclass
class Chain:
    """Transforms applied in order: the first wraps the callable innermost."""

    transforms: tuple

    def __call__(self, inner: Any) -> Any:
        for t in self.transforms:
            inner = t(inner)
        return inner


def chain(*transforms: Callable[[Any], Any] | None) -> Chain:
    """Compose transforms like ``optax.chain``: ``chain(a, b)(f) == b(a(f))``.

    ``None`` entries are skipped, so optional transforms compose without branching (``chain()`` is the
    identity); a :class:`Chain` inside a chain is flattened into it."""
    flat: list = []
    for i, t in enumerate(transforms):
        if t is None:
            continue
        if not callable(t):
            raise TypeError(f"transform {i} is not callable ({type(t).__name__}); "
                            "pass transforms such as classifier_free(...) or concat(...), not denoisers or networks")
        flat.extend(t.transforms if isinstance(t, Chain) else (t,))
    return Chain(tuple(flat))


def apply(fn: Any, *transforms: Callable[[Any], Any] | None) -> Any:
    """Wrap ``fn`` (a denoiser or a network) in ``transforms``, in order (the first is innermost)."""
    return chain(*transforms)(fn)
