"""Attention control: read and edit the attention of a network from outside, without state.

Every attention layer of the conditional U-Net, ControlNet and DiT carries a static :class:`Site`
(its diffusers module path, ``"self"`` or ``"cross"``, its heads), set once after construction by
:func:`assign_sites`; the query grid ``(h, w)`` is known when the layer runs. A *control* is a small
pytree handed to the call, ``unet(x, t, text, control=c)``; it can

- edit the probabilities ``P = softmax(q k^T / sqrt(d))`` at chosen sites and sampling steps
  (:class:`Replace`, Prompt-to-Prompt's word swap; :class:`Add`; :class:`Reweight`, per-token
  re-weighting; :class:`Set`, e.g. uniform) (Hertz et al. 2022, "Prompt-to-Prompt Image Editing
  with Cross Attention Control", Sec. 3.2);
- transform the context that keys and values read (:class:`Hypernetwork`, as NovelAI / AUTOMATIC1111
  hypernetworks: ``k = to_k(f_k(context))``, ``v = to_v(f_v(context))``);
- record maps (:class:`Record`), returned by ``unet(..., control=c, return_records=True)`` as
  ``(out, {path: (B, T_q, T_k)})``.

Numbers (factors, rows, step ranges) are traced leaves, so changing them never recompiles; site
filters (:class:`Where`) are static. Several controls compose (:func:`compose`), applied in order.
Only sites a control edits or records form the probabilities explicitly (float32 softmax, then
``P v``); elsewhere, and without a control, the layer calls :func:`jaxdiff.models.attention.attention`
exactly as without this module.

A control is any pytree with a static ``where`` (a :class:`Where`) and any of the methods
``context(ctx_k, ctx_v) -> (ctx_k, ctx_v)``, ``edit(p) -> p`` (``p``: float32 (B, heads, T_q, T_k); with an
optional ``steps`` field, a :class:`Steps`) and ``record(p) -> array``: a user's own control is a
few lines.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform
from jaxdiff.conditioning import StepIndex

Array = jax.Array
KINDS = ("self", "cross")
_NEVER = 2 ** 31 - 1


# ---- sites ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """Where an attention layer sits: diffusers' module path (a key of ``unet.attn_processors`` less
    ``.processor``), ``"self"`` or ``"cross"``, and its number of heads. Static (hashable) graph data."""

    path: str
    kind: str
    heads: int


def assign_sites(model: nnx.Module) -> nnx.Module:
    """Give every attention layer of ``model`` (those with a ``site``) its path in ``model``; returns it."""
    for path, node in nnx.iter_graph(model):
        site = getattr(node, "site", None)
        if isinstance(site, Site):
            node.site = dataclasses.replace(site, path=".".join(map(str, path)))
    return model


def sites(model: nnx.Module) -> list[Site]:
    """The sites of ``model``'s attention layers, in graph order."""
    return [node.site for _, node in nnx.iter_graph(model) if isinstance(getattr(node, "site", None), Site)]


@dataclass(frozen=True)
class Where:
    """A static site filter; every criterion given must hold.

    ``kind``: ``"self"`` or ``"cross"``. ``paths``: a site matches a path or anything below it
    (``("up_blocks",)`` selects every up-block site). ``resolution``: the query grid, ``(h, w)``, or
    an int ``r`` for an ``r x r`` grid (a layer called on a flat sequence has no grid and never matches).
    """

    kind: str | None = None
    paths: tuple[str, ...] | None = None
    resolution: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (None, *KINDS):
            raise ValueError(f"Where(kind={self.kind!r}): use 'self', 'cross' or None")
        if isinstance(self.paths, str):
            raise TypeError("Where(paths=...) takes a tuple of paths, not one string: write paths=(path,)")
        if self.paths is not None:
            object.__setattr__(self, "paths", tuple(self.paths))
        if isinstance(self.resolution, list):
            object.__setattr__(self, "resolution", tuple(self.resolution))

    def __call__(self, site: Site, hw: tuple[int, int] | None) -> bool:
        if self.kind is not None and site.kind != self.kind:
            return False
        if self.paths is not None and not any(site.path == p or site.path.startswith(p + ".") for p in self.paths):
            return False
        if self.resolution is not None:
            want = (self.resolution,) * 2 if isinstance(self.resolution, int) else tuple(self.resolution)
            return hw is not None and tuple(hw) == want
        return True


EVERYWHERE, CROSS, SELF = Where(), Where(kind="cross"), Where(kind="self")


# ---- steps ------------------------------------------------------------------------------------------

@pytree_dataclass
class Steps:
    """Sampling steps ``start <= i < stop`` (traced), with ``i`` set by the sampling runner each step."""

    start: Any = 0
    stop: Any = _NEVER
    index: StepIndex = field(default_factory=StepIndex)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", jnp.asarray(self.start, jnp.int32))
        object.__setattr__(self, "stop", jnp.asarray(self.stop, jnp.int32))

    def active(self) -> Array:
        i = self.index.value
        return (self.start <= i) & (i < self.stop)


def _steps(steps: Any) -> Steps:
    return steps if isinstance(steps, Steps) else Steps(*steps)


def _as_probs(a: Any) -> Array:
    """(B, T_q, T_k) maps (what :class:`Record` gives) gain a heads axis; other shapes broadcast as given."""
    a = jnp.asarray(a, jnp.float32)
    return a[:, None] if a.ndim == 3 else a


# ---- controls ---------------------------------------------------------------------------------------

@pytree_dataclass
class Replace:
    """Row ``b`` of the batch takes the probabilities of row ``rows[b]`` (Prompt-to-Prompt word swap:
    the edited prompt's rows take the source prompt's maps during the first steps)."""

    rows: Array
    where: Where = static_field(default=EVERYWHERE)
    steps: Steps = field(default_factory=Steps)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", jnp.asarray(self.rows, jnp.int32))
        object.__setattr__(self, "steps", _steps(self.steps))

    def edit(self, p: Array) -> Array:
        return p[self.rows]


@pytree_dataclass
class Add:
    """``P + delta``; ``delta`` broadcasts to (B, heads, T_q, T_k), a (B, T_q, T_k) map to every head."""

    delta: Array
    where: Where = static_field(default=EVERYWHERE)
    steps: Steps = field(default_factory=Steps)

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", jnp.asarray(self.delta, jnp.float32))
        object.__setattr__(self, "steps", _steps(self.steps))

    def edit(self, p: Array) -> Array:
        return p + _as_probs(self.delta)


@pytree_dataclass
class Reweight:
    """Key column ``j`` times ``factors[j]`` ((T_k,), or (B, T_k) per network row: under classifier-free
    guidance both halves), not renormalised (Prompt-to-Prompt's attention re-weighting). Default sites:
    cross-attention (keys are tokens)."""

    factors: Array
    where: Where = static_field(default=CROSS)
    steps: Steps = field(default_factory=Steps)

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", jnp.asarray(self.factors, jnp.float32))
        object.__setattr__(self, "steps", _steps(self.steps))

    def edit(self, p: Array) -> Array:
        f = self.factors
        return p * (f[:, None, None, :] if f.ndim == 2 else f)


@pytree_dataclass
class Set:
    """The probabilities become ``probs`` (broadcast like :class:`Add`'s ``delta``); ``None``: uniform."""

    probs: Array | None = None
    where: Where = static_field(default=EVERYWHERE)
    steps: Steps = field(default_factory=Steps)

    def __post_init__(self) -> None:
        if self.probs is not None:
            object.__setattr__(self, "probs", jnp.asarray(self.probs, jnp.float32))
        object.__setattr__(self, "steps", _steps(self.steps))

    def edit(self, p: Array) -> Array:
        new = jnp.full_like(p, 1.0 / p.shape[-1]) if self.probs is None else _as_probs(self.probs)
        return jnp.broadcast_to(new, p.shape)


@pytree_dataclass
class Hypernetwork:
    """Keys read ``k(context)`` and values ``v(context)`` (pytree callables; ``None``: unchanged).
    Default sites: cross-attention."""

    k: Callable[[Array], Array] | None = None
    v: Callable[[Array], Array] | None = None
    where: Where = static_field(default=CROSS)

    def context(self, ctx_k: Array, ctx_v: Array) -> tuple[Array, Array]:
        return (ctx_k if self.k is None else self.k(ctx_k)), (ctx_v if self.v is None else self.v(ctx_v))


@pytree_dataclass
class Record:
    """Record the probabilities at the chosen sites, averaged over heads ((B, T_q, T_k)), or per head
    ((B, heads, T_q, T_k)) with ``per_head``. Keyed by site path; a later record at a site replaces an
    earlier one, so a :class:`Record` after an edit sees the edited maps."""

    where: Where = static_field(default=EVERYWHERE)
    per_head: bool = static_field(default=False)

    def record(self, p: Array) -> Array:
        return p if self.per_head else p.mean(axis=1)


@pytree_dataclass
class Controls:
    """Several controls, applied in order."""

    items: tuple


def compose(*controls: Any) -> Controls:
    """One control applying ``controls`` in order (``None`` skipped, nested :class:`Controls` flattened)."""
    flat: list = []
    for c in controls:
        if c is None:
            continue
        if isinstance(c, Controls):
            flat.extend(c.items)
        elif isinstance(getattr(c, "where", None), Where):
            flat.append(c)
        else:
            raise TypeError(f"{type(c).__name__} is not an attention control: it needs a static `where` "
                            "(a Where) and a context, edit or record method")
    return Controls(tuple(flat))


# ---- one network call -------------------------------------------------------------------------------

class ControlRun:
    """One network call's controls and the maps they record (what the layers take as ``control``).

    The top-level ``__call__`` creates it and returns ``records`` as an output. This stays pure
    under ``jit``: the object and its dict live only while that call is traced, the layers write
    traced arrays into it, and they leave the trace only as the call's return value (no module or
    global state, nothing carried between calls; a second trace builds a new run).
    """

    def __init__(self, control: Any):
        self.controls = compose(control).items
        self.records: dict[str, Array] = {}

    def _at(self, site: Site, hw: tuple[int, int] | None, method: str) -> list:
        return [c for c in self.controls if hasattr(c, method) and c.where(site, hw)]

    def context(self, site: Site, hw: tuple[int, int] | None, ctx: Array) -> tuple[Array, Array]:
        """The contexts keys and values read at ``site`` (each :class:`Hypernetwork` in turn)."""
        ck = cv = ctx
        for c in self._at(site, hw, "context"):
            ck, cv = c.context(ck, cv)
        return ck, cv

    def explicit(self, site: Site, hw: tuple[int, int] | None) -> bool:
        """Whether ``site`` needs its probabilities formed (a control edits or records there); static."""
        return bool(self._at(site, hw, "edit") or self._at(site, hw, "record"))

    def attend(self, site: Site, hw: tuple[int, int] | None, q: Array, k: Array, v: Array,
               bias: Array | None = None) -> Array:
        """``P v`` on (B, T, heads, d) arrays with ``P = softmax(q k^T / sqrt(d) + bias)`` in float32, edited and
        recorded by the controls in order (``bias``: optional, broadcast to (B, heads, T_q, T_k)).

        Where no control edits, the output is ``(E v) / sum(E)`` with ``E = exp(logits - max)``, as the fast
        kernel computes it, and the records read ``E / sum(E)`` (which XLA fuses into their reductions), so
        recording costs one pass over the logits rather than a normalised copy."""
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads-major, as the fast kernel (faster on XLA:CPU)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        if bias is not None:
            logits = logits + jnp.asarray(bias, jnp.float32)
        e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
        total = e.sum(axis=-1, keepdims=True)
        p, edited = e / total, False
        for c in self.controls:
            if not c.where(site, hw):
                continue
            if hasattr(c, "edit"):
                steps = getattr(c, "steps", None)
                new = c.edit(p).astype(jnp.float32)
                p, edited = (new if steps is None else jnp.where(steps.active(), new, p)), True
            if hasattr(c, "record"):
                self.records[site.path] = c.record(p)
        v32 = v.astype(jnp.float32)
        out = jnp.einsum("bhqk,bhkd->bhqd", p, v32) if edited else jnp.einsum("bhqk,bhkd->bhqd", e, v32) / total
        return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def start(control: Any) -> ControlRun | None:
    """The run a top-level ``__call__`` hands its layers (``None`` without a control: the fast path)."""
    return None if control is None else ControlRun(control)


def finish(out: Any, run: ControlRun | None, return_records: bool) -> Any:
    """``out``, or ``(out, records)`` when ``return_records`` (``{}`` without a control)."""
    return (out, {} if run is None else run.records) if return_records else out


# ---- the network transform --------------------------------------------------------------------------

@pytree_dataclass
class AttentionControlled:
    """``inner(x, t, {**cond, "attention": c})`` with ``c`` any control already in ``cond`` followed by
    ``control`` (the network reads ``cond["attention"]``, e.g. ``UNetNet``)."""

    inner: Any
    control: Any

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        cond = dict(cond or {})
        cond["attention"] = compose(cond.get("attention"), self.control)
        return self.inner(x, t, cond)


def attention_control(*controls: Any) -> Transform:
    """Network transform adding ``controls`` (in order) to every call's attention control."""
    return Transform(AttentionControlled, dict(control=compose(*controls)))
