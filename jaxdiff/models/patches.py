"""Weight patches: pure ``state -> state`` functions on a loaded network, and a per-call network transform.

A loaded network is a :class:`~jaxdiff.models._pure.PureModel` whose ``state`` (an ``nnx.State``) has
paths that mirror the checkpoint names (:func:`jaxdiff.convert.torch_layout.checkpoint_name`), so a
patch written against PyTorch names finds its parameters by name:

- a **low-rank** patch (LoRA, Hu et al. 2021, Eq. 3): per target layer ``down`` (r, in), ``up`` (out, r)
  and ``alpha``; ``W' = W + scale * (alpha / r) * up @ down``. Convolutions use the LoRA-conv form of
  kohya / diffusers: ``down`` a conv (r, in, kh, kw) with the layer's kernel size, ``up`` a 1x1 conv
  (out, r, 1, 1), so the delta is the kernel of their composition ``sum_r up[o, r] * down[r, i, y, x]``;
- a **full delta** patch: ``W' = W + scale * delta`` for any parameter (kernels, biases, norms, tables).

Both are converted once from PyTorch names and layouts (:func:`lora`, :func:`full_delta`) into a
:class:`Patch` keyed by state names in jaxdiff's layout. :func:`merge` folds a patch into a state;
:func:`patch_weights` is a network transform (:mod:`jaxdiff.conditioning`) that patches the weights at
every call with a *traced* scale, so changing the scale, or turning the patch off with 0, reuses the
compiled program. Unknown or mis-shaped targets raise one :class:`PatchMismatchError` listing them all,
before anything is patched.

Token-embedding tables grow without changing shapes: :func:`pad_embedding` pads a table to a capacity
once, and :func:`set_embedding_rows` writes new tokens' rows (textual inversion) into the padding.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform
from jaxdiff.conditioning import per_image_value
from jaxdiff.convert.torch_layout import checkpoint_name, state_name, to_jax_layout, to_torch_layout, torch_name_map
from jaxdiff.models._pure import PureModel

Array = jax.Array


class PatchMismatchError(ValueError):
    """A patch does not fit the model: lists every unknown, incomplete or mis-shaped target."""


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _params(state: nnx.State) -> dict[str, Any]:
    """State name -> array (or abstract array) of every variable of ``state``."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.RngState):
            out[state_name(path)] = var.get_value()
    return out


def _fail(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise PatchMismatchError(f"{what} does not fit the model ({len(problems)} problem(s)): {shown}. "
                                 "Check that the patch was made for this network (and pass prefix= / rename= "
                                 "for files that hold several networks).")


# ---- the patch values --------------------------------------------------------------------------------------


@pytree_dataclass
class LowRank:
    """``(alpha / r) * down @ up`` in jaxdiff's layout: ``down`` (in, r) or (kh, kw, in, r), ``up`` (r, out)."""

    down: Array
    up: Array
    alpha: Array

    @property
    def rank(self) -> int:
        return self.up.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.down.shape[:-1], self.up.shape[-1])

    def delta(self) -> Array:
        """The float32 weight delta, shaped as the target kernel."""
        prod = jnp.tensordot(self.down.astype(jnp.float32), self.up.astype(jnp.float32), axes=1)
        return (jnp.asarray(self.alpha, jnp.float32) / self.rank) * prod


@pytree_dataclass
class Patch:
    """Weight deltas keyed by state name (``...attn1.to_q.kernel``), in jaxdiff's layouts."""

    low_rank: dict
    full: dict

    def names(self) -> list[str]:
        return sorted({*self.low_rank, *self.full})

    def deltas(self) -> dict[str, Array]:
        """State name -> float32 delta (low-rank and full deltas of one parameter summed)."""
        out = {name: lr.delta() for name, lr in self.low_rank.items()}
        for name, d in self.full.items():
            d = jnp.asarray(d, jnp.float32)
            out[name] = out[name] + d if name in out else d
        return out


def _check_against(patch: Patch, params: Mapping[str, Any]) -> list[str]:
    problems = []
    shapes = {**{k: lr.shape for k, lr in patch.low_rank.items()}, **{k: tuple(d.shape) for k, d in patch.full.items()}}
    for name in sorted(shapes):
        if name not in params:
            problems.append(f"{checkpoint_name(name)}: no such parameter")
        elif tuple(params[name].shape) != shapes[name]:
            problems.append(f"{checkpoint_name(name)}: patch {shapes[name]}, model {tuple(params[name].shape)}")
    return problems


# ---- conversion from PyTorch names and layouts ----------------------------------------------------------


def _model_state(like: Any) -> nnx.State:
    if isinstance(like, PureModel):
        return like.state
    if isinstance(like, nnx.Module):
        return nnx.state(like)
    return like


def _select(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _target(module: str, names: Mapping[str, Any], underscored: Mapping[str, str],
            rename: Callable[[str], str | None] | None) -> str | None:
    """The checkpoint name of the weight that LoRA target ``module`` patches (dotted or kohya's underscored)."""
    key = module + ".weight"
    if rename is not None:
        key = rename(key) or key
    if key in names:
        return key
    if module in underscored:
        return underscored[module]
    return underscored.get(key[: -len(".weight")].replace(".", "_"))  # kohya names of renamed checkpoints


def lora(tensors: Mapping[str, Any], like: Any, *, prefix: str = "",
         alpha: float | Callable[[str, int], float] | None = None,
         rename: Callable[[str], str | None] | None = None) -> Patch:
    """A :class:`Patch` from a LoRA file's tensors (PyTorch names and layouts), converted once.

    Recognised per target ``T`` (a module name such as ``down_blocks.0.attentions.0.proj_in``): the low-rank
    pairs ``T.lora_A.weight`` / ``T.lora_B.weight`` (peft, diffusers), ``T.lora_down.weight`` /
    ``T.lora_up.weight`` (kohya), ``T.lora.down.weight`` / ``T.lora.up.weight`` and the older diffusers names
    (``T.lora_linear_layer.down.weight``, ``attn.processor.to_q_lora.down.weight``), with an optional scalar
    ``T.alpha``; LyCORIS LoHa (``T.hada_w1_a``...) and LoKr (``T.lokr_w1``...) become full deltas
    (:mod:`jaxdiff.models.lora_formats`). Without ``T.alpha`` the scale is ``alpha / r``: ``alpha`` a number, or
    ``alpha(T, r)`` (PEFT's metadata, :func:`jaxdiff.models.lora_formats.alpha_rule`), default ``r`` (scale 1, as
    peft). Kohya's underscored targets (``lora_unet_down_blocks_0_..._to_q`` with ``prefix="lora_unet_"``) are
    matched to the model's dotted names. ``like`` is the model (a ``PureModel``, module or state; abstract is
    fine), ``prefix`` selects and strips one network's keys (``"unet."``, ``"text_encoder."``), ``rename`` maps a
    checkpoint name to the model's (as the loaders' ``rename_torch_key``). Raises :class:`PatchMismatchError`
    listing every key that does not fit; nothing is converted half-way.
    """
    patch, problems = lora_problems(tensors, like, prefix=prefix, alpha=alpha, rename=rename)
    _fail(problems, "LoRA")
    return patch


def lora_problems(tensors: Mapping[str, Any], like: Any, *, prefix: str = "",
                  alpha: float | Callable[[str, int], float] | None = None,
                  rename: Callable[[str], str | None] | None = None) -> tuple[Patch, list[str]]:
    """:func:`lora` without raising: (the patch of the keys that fit, the problems of the others)."""
    from jaxdiff.models import lora_formats as F

    state = _model_state(like)
    names = torch_name_map(state)
    underscored = {k[: -len(".weight")].replace(".", "_"): k for k in names if k.endswith(".weight")}
    params = _params(state)
    modules, problems = F.group(_select(tensors, prefix))
    problems = [prefix + p for p in problems]
    low_rank, full = {}, {}
    for module, parts in sorted(modules.items()):
        target = _target(module, names, underscored, rename)
        if target is None:
            problems.append(f"{prefix}{module}: no such layer in the model")
            continue
        path, kind = names[target]
        shape = tuple(params[state_name(path)].shape)
        style = F.kind(parts)
        if kind != "kernel":
            problems.append(f"{prefix}{module}: targets {target}, not a Linear or Conv kernel")
        elif style != "lora":
            try:
                torch_shape = tuple(np.shape(to_torch_layout(np.zeros(shape, np.float32), kind)))
                maths = F.loha_delta if style == "loha" else F.lokr_delta
                full[state_name(path)] = jnp.asarray(to_jax_layout(maths(parts, torch_shape), kind))
            except ValueError as e:
                problems.append(f"{prefix}{module}: {e}")
        elif "down" not in parts or "up" not in parts:
            have = [r for r in ("down", "up") if r in parts]
            problems.append(f"{prefix}{module}: has only the {have[0]} matrix" if have else
                            f"{prefix}{module}: has an alpha but no down / up matrices")
        else:
            entry = _low_rank(parts, module, target, shape, alpha)
            if isinstance(entry, str):
                problems.append(f"{prefix}{entry}")
            else:
                low_rank[state_name(path)] = entry
    patch = Patch(low_rank, full)
    problems += [prefix + p for p in _check_against(patch, params)]
    return patch, problems


def _low_rank(parts: Mapping[str, Any], module: str, target: str, shape: tuple[int, ...],
              alpha: float | Callable[[str, int], float] | None) -> LowRank | str:
    """The :class:`LowRank` of one (down, up[, alpha]) pair, or the problem with it."""
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    if up.ndim != down.ndim or up.ndim < 2 or up.shape[1] != rank or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return f"{module}: down {down.shape} and up {up.shape} are not a LoRA pair for {target} {shape}"
    if "alpha" in parts:
        a = float(np.asarray(parts["alpha"]))
    elif callable(alpha):
        a = float(alpha(module, rank))
    else:
        a = float(alpha) if alpha is not None else float(rank)
    return LowRank(jnp.asarray(to_jax_layout(down, "kernel")), jnp.asarray(up.reshape(up.shape[:2]).T),
                   jnp.asarray(a, jnp.float32))


def full_delta(tensors: Mapping[str, Any], like: Any, *, prefix: str = "",
               rename: Callable[[str], str | None] | None = None) -> Patch:
    """A full-delta :class:`Patch` (``W' = W + scale * delta``) from PyTorch-named, PyTorch-laid-out deltas."""
    state = _model_state(like)
    names = torch_name_map(state)
    full, problems = {}, []
    for key, value in sorted(_select(tensors, prefix).items()):
        target = rename(key) if rename is not None else key
        if target not in names:
            problems.append(f"{prefix}{key}: no such parameter")
            continue
        path, kind = names[target]
        full[state_name(path)] = jnp.asarray(to_jax_layout(np.asarray(value), kind))
    patch = Patch({}, full)
    problems += _check_against(patch, _params(state))
    _fail(problems, "full-delta patch")
    return patch


# ---- applying patches -------------------------------------------------------------------------------------


def _apply_deltas(state: nnx.State, deltas: Mapping[str, Array], scale: Any) -> nnx.State:
    scale = jnp.asarray(scale, jnp.float32)

    def one(path: tuple, var: Any) -> Any:
        if not _is_var(var):
            return var
        delta = deltas.get(_path_name(path))
        if delta is None:
            return var
        w = var.get_value()
        return var.replace((w.astype(jnp.float32) + scale * delta).astype(w.dtype))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def merge(state: Any, patch: Patch, scale: Any = 1.0) -> Any:
    """``state`` with ``W + scale * delta`` for every target of ``patch`` (pure; also takes a ``PureModel``).

    Every target is checked first: an unknown or mis-shaped one raises :class:`PatchMismatchError` and
    nothing is patched."""
    if isinstance(state, PureModel):
        return PureModel(merge(state.state, patch, scale), state.graphdef, state.method)
    _fail(_check_against(patch, _params(state)), "patch")
    return _apply_deltas(state, patch.deltas(), scale)


def _is_pure(x: Any) -> bool:
    return isinstance(x, PureModel)


def _model_type(model: PureModel) -> type | None:
    nodes = getattr(model.graphdef, "nodes", None)
    return getattr(nodes[0], "type", None) if nodes else None


@pytree_dataclass
class PatchWeights:
    """``inner`` with its weights patched at every call: ``W + scales[i] * delta_i`` (scales are traced leaves).

    Each patch applies to the one :class:`PureModel` inside ``inner`` whose state holds all its targets; when
    several do (a U-Net and its ControlNet share block names), ``model`` (a module class) chooses: every
    model of that class is patched."""

    inner: Any
    patches: tuple
    scales: tuple
    model: type | None = static_field(default=None)

    def patched(self) -> Any:
        """``inner`` with every patch applied at its scale (traceable; checks run at trace time)."""
        models = [m for m in jax.tree_util.tree_leaves(self.inner, is_leaf=_is_pure) if _is_pure(m)]
        if self.model is not None:
            models = [m for m in models if _model_type(m) is self.model]
        if not models:
            raise PatchMismatchError(f"no PureModel{'' if self.model is None else ' of ' + self.model.__name__} inside "
                                     f"the network ({type(self.inner).__name__}): patch_weights needs networks "
                                     "that hold their weights as PureModel")
        params = [_params(m.state) for m in models]
        plan: dict[int, list[tuple[dict, Any]]] = {}
        for patch, scale in zip(self.patches, self.scales):
            scale = per_image_value(scale)  # image i's scale (1,) when the recipe fills a PerImage slot
            fits = [i for i, p in enumerate(params) if not _check_against(patch, p)]
            if not fits:
                best = min(range(len(models)), key=lambda i: len(_check_against(patch, params[i])))
                closest = _model_type(models[best]).__name__
                _fail(_check_against(patch, params[best]), f"patch (closest model: {closest})")
            if len(fits) > 1 and self.model is None:
                kinds = ", ".join(_model_type(models[i]).__name__ for i in fits)
                raise PatchMismatchError(f"the patch fits {len(fits)} models inside the network ({kinds}); "
                                         "pass patch_weights(..., model=<module class>) to choose one")
            deltas = patch.deltas()
            for i in fits:
                plan.setdefault(id(models[i]), []).append((deltas, scale))

        def apply(node: Any) -> Any:
            if not _is_pure(node) or id(node) not in plan:
                return node
            state = node.state
            for deltas, scale in plan[id(node)]:
                state = _apply_deltas(state, deltas, scale)
            return PureModel(state, node.graphdef, node.method)

        return jax.tree_util.tree_map(apply, self.inner, is_leaf=_is_pure)

    def __call__(self, x: Array, t: Array, cond: Any) -> Array:
        return self.patched()(x, t, cond)


def patch_weights(patch: Patch, scale: Any = 1.0, *, model: type | None = None) -> Transform:
    """Network transform: call the network with ``patch`` applied at ``scale`` (a traced leaf: a new scale,
    or 0 to turn the patch off, reuses the compiled program). Chain several for several patches."""
    return Transform(PatchWeights, {"patches": (patch,), "scales": (jnp.asarray(scale, jnp.float32),)},
                     (("model", model),))


def fuse(state: Any, patch: Patch, scale: Any = 1.0) -> tuple[Any, dict[str, Array]]:
    """(``merge(state, patch, scale)``, the original arrays of the parameters it changed): :func:`unfuse` with
    them restores ``state`` bit for bit (the originals are kept, not recomputed by subtraction)."""
    if isinstance(state, PureModel):
        fused, originals = fuse(state.state, patch, scale)
        return PureModel(fused, state.graphdef, state.method), originals
    params = _params(state)
    _fail(_check_against(patch, params), "patch")
    return _apply_deltas(state, patch.deltas(), scale), {name: params[name] for name in patch.names()}


def unfuse(state: Any, originals: Mapping[str, Array]) -> Any:
    """``state`` with the parameters :func:`fuse` changed set back to ``originals`` (exact)."""
    if isinstance(state, PureModel):
        return PureModel(unfuse(state.state, originals), state.graphdef, state.method)
    missing = sorted(set(originals) - set(_params(state)))
    if missing:
        raise PatchMismatchError(f"cannot unfuse: the model has no parameter(s) {', '.join(missing[:5])}; "
                                 "unfuse the model the patch was fused into")

    def one(path: tuple, var: Any) -> Any:
        if not _is_var(var) or _path_name(path) not in originals:
            return var
        return var.replace(originals[_path_name(path)])

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


@pytree_dataclass
class PatchedModel:
    """A :class:`PureModel` whose weights are patched at every call, ``W + sum_i scales[i] * delta_i``.

    Stands in for the model wherever a ``PureModel`` is called (``model(...)``, ``model.bind("method")(...)``):
    the scales are traced leaves, so new scales (0: off) reuse a compiled program. A scale of shape (B,) is
    per row: row ``b`` of the first argument (batch axis 0) runs with ``scales[i][b]`` (rows beyond ``B``, as
    padding adds, take the last entry)."""

    base: PureModel
    patches: tuple
    scales: tuple

    def __post_init__(self) -> None:
        if len(self.patches) != len(self.scales):
            raise ValueError(f"{len(self.patches)} patches but {len(self.scales)} scales: give one scale per patch")

    @property
    def graphdef(self) -> Any:
        return self.base.graphdef

    @property
    def method(self) -> str:
        return self.base.method

    def bind(self, method: str) -> "PatchedModel":
        return PatchedModel(self.base.bind(method), self.patches, self.scales)

    def _at(self, scales: tuple) -> PureModel:
        state = self.base.state
        for patch, scale in zip(self.patches, scales):
            state = _apply_deltas(state, patch.deltas(), scale)
        return PureModel(state, self.base.graphdef, self.base.method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for patch in self.patches:
            _fail(_check_against(patch, _params(self.base.state)), "patch")
        scales = tuple(jnp.asarray(s, jnp.float32) for s in self.scales)
        if all(s.ndim == 0 for s in scales):
            return self._at(scales)(*args, **kwargs)
        rows = args[0].shape[0]

        def per_row(s: Array) -> Array:
            s = jnp.broadcast_to(s, (1,)) if s.ndim == 0 else s
            if s.ndim != 1:
                raise ValueError(f"a patch scale must be a number or one per row (B,), got shape {s.shape}")
            return s[jnp.minimum(jnp.arange(rows), s.shape[0] - 1)] if s.shape[0] > 1 else jnp.broadcast_to(s, (rows,))

        def one(row_scales: tuple, first: Array) -> Any:
            out = self._at(row_scales)(first[None], *args[1:], **kwargs)
            return jax.tree_util.tree_map(lambda a: a[0], out)

        return jax.vmap(one)(tuple(per_row(s) for s in scales), args[0])


# ---- growable embedding tables ----------------------------------------------------------------------------


def _resolve(state: nnx.State, name: str) -> str:
    """A state name from a state name or a checkpoint name."""
    params = _params(state)
    if name in params:
        return name
    found = torch_name_map(state).get(name)
    if found is None:
        raise KeyError(f"the model has no parameter {name!r} (give a checkpoint name such as "
                       "'text_model.embeddings.token_embedding.weight' or a state name)")
    return state_name(found[0])


def _edit(state: Any, name: str, fn: Callable[[Array], Array]) -> Any:
    if isinstance(state, PureModel):
        return PureModel(_edit(state.state, name, fn), state.graphdef, state.method)
    target = _resolve(state, name)

    def one(path: tuple, var: Any) -> Any:
        return var.replace(fn(var.get_value())) if _is_var(var) and _path_name(path) == target else var

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def pad_embedding(state: Any, name: str, capacity: int) -> Any:
    """The table ``name`` (vocab, dim) zero-padded to ``(capacity, dim)``; ids below ``vocab`` read the same rows.

    Pad once, before compiling: new tokens (:func:`set_embedding_rows`) then fill rows that exist already,
    so their ids change values only, never shapes. For CLIP text configs with the legacy ``eos_token_id == 2``
    the pooled output is read at ``argmax(input_ids)``, so once a prompt holds an added id (above the EOS id)
    it pools at that token instead of EOS, exactly as transformers does; the hidden states are unaffected
    (see :meth:`jaxdiff.models.clip.CLIPTextTransformer.pool`)."""
    def pad(table: Array) -> Array:
        if table.ndim != 2 or capacity < table.shape[0]:
            raise ValueError(f"cannot pad the {tuple(table.shape)} table {name!r} to capacity {capacity}: "
                             "need a (vocab, dim) table and a capacity >= vocab")
        return jnp.pad(table, ((0, capacity - table.shape[0]), (0, 0)))

    return _edit(state, name, pad)


def set_embedding_rows(state: Any, name: str, rows: Any, start: int | Array) -> Any:
    """The table ``name`` with rows ``start .. start + len(rows) - 1`` set to ``rows`` (n, dim) (shapes kept).

    With a padded table (:func:`pad_embedding`) this adds tokens: ids ``start ...`` now embed as ``rows``.
    ``start`` may be traced; a static one is checked against the capacity."""
    rows = jnp.asarray(rows)

    def put(table: Array) -> Array:
        r = rows.reshape(-1, table.shape[-1]) if rows.ndim == 1 else rows
        if r.ndim != 2 or r.shape[1] != table.shape[1]:
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit the {tuple(table.shape)} table {name!r}")
        if isinstance(start, int) and not 0 <= start <= table.shape[0] - r.shape[0]:
            raise ValueError(f"rows {start}..{start + r.shape[0] - 1} are outside the {table.shape[0]}-row table "
                             f"{name!r}; pad it first (pad_embedding) to a larger capacity")
        return jax.lax.dynamic_update_slice_in_dim(table, r.astype(table.dtype), start, axis=0)

    return _edit(state, name, put)
