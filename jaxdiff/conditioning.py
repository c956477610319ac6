"""Network transforms: ``net -> net`` in the network's own coordinates ``net(x, t, cond)``.

Denoiser transforms (:mod:`jaxdiff.guidance`) wrap ``D(x, sigma, cond)`` outside the parameterisation;
what must happen at *every network call inside guidance* wraps the network instead: concatenation
conditioning (inpainting U-Nets, depth-to-image, Palette), residuals from side networks (ControlNet,
T2I-Adapter), attention control, scaled weight patches. Both kinds are pytree callables composed by
the same :func:`chain` / :func:`apply`::

    net = conditioning.apply(UNetNet(unet), conditioning.concat(depth_latents))
    den = guidance.apply(DiscreteVPDenoiser(net, alphas_cumprod), guidance.classifier_free(7.5, uncond))

Conventions for dictionary conditioning (what :class:`jaxdiff.pipelines.stable_diffusion.UNetNet` reads):
``"context"`` the text embeddings, ``"residuals"`` a :class:`Residuals`, ``"attention"`` an attention
control (:mod:`jaxdiff.models.attention_control`), ``"class_labels"``, and ``"conditional"`` (B,): 1 for
the rows of the conditional half of classifier-free guidance, 0 for the unconditional ones, which
per-half transforms (ControlNet's guess mode) read.

The runner hands each step its index: every :class:`StepIndex` inside the denoiser or the
conditioning is replaced by the current step (a traced int32) before the step runs, so a control that
acts on chosen steps holds a ``StepIndex`` field and reads ``.value``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Chain, Transform, apply, as_pytree_callable, chain, float_leaf
from jaxdiff._util import expand_to

Array = jax.Array
Network = Callable[..., Array]
CONDITIONAL = "conditional"

__all__ = ["CONDITIONAL", "Chain", "Concat", "PerImage", "Residuals", "SideNetwork", "StepIndex", "Transform",
           "add_residuals", "apply", "at_step", "chain", "concat", "conditional_flag", "fill_per_image", "side_network",
           "take_per_image", "tile_batch"]


# ---- the step index ------------------------------------------------------------------------------

@pytree_dataclass
class StepIndex:
    """The sampling step being run (``value``), the run's first step (``first``: image-to-image starts late) and
    its step count (``count``), traced int32s the runner sets before every step (:func:`at_step`); ``count`` is
    None until then. A control acting on a fraction of the run (ControlNet's interval) reads all three."""

    value: Any = 0
    first: Any = 0
    count: Any = None

    def __post_init__(self) -> None:
        for name in ("value", "first", "count"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, jnp.asarray(getattr(self, name), jnp.int32))


def _is_step(node: Any) -> bool:
    return isinstance(node, StepIndex)


def at_step(tree: Any, step: Any, first: Any = 0, count: Any = None) -> Any:
    """``tree`` with every :class:`StepIndex` in it set to ``(step, first, count)`` (the identity on trees without
    one)."""
    return jax.tree_util.tree_map(lambda n: StepIndex(step, first, count) if _is_step(n) else n, tree,
                                  is_leaf=_is_step)


# ---- per-image values ----------------------------------------------------------------------------

@pytree_dataclass
class PerImage:
    """An array inside a network transform with one entry per image of the call (axis 0), e.g. one control
    image per prompt. A recipe that samples each image on its own (the SD recipe vmaps over images) takes
    these out (:func:`take_per_image`), batches them with the request and puts image ``i``'s entry back
    (:func:`fill_per_image`) with a batch axis of one: the transform then reads an ordinary (1, ...) array."""

    value: Any


def _is_per_image(node: Any) -> bool:
    return isinstance(node, PerImage)


def take_per_image(tree: Any) -> tuple[Any, tuple]:
    """(``tree`` with every :class:`PerImage` emptied, their values in tree order)."""
    values: list = []

    def take(node: Any) -> Any:
        if _is_per_image(node) and node.value is not None:
            values.append(node.value)
            return PerImage(None)
        return node

    return jax.tree_util.tree_map(take, tree, is_leaf=_is_per_image), tuple(values)


def fill_per_image(tree: Any, values: tuple) -> Any:
    """Put ``values`` (one image's entries, in the order :func:`take_per_image` gave) back into the empty slots."""
    it = iter(values)
    filled = jax.tree_util.tree_map(lambda n: PerImage(next(it)) if _is_per_image(n) else n, tree,
                                    is_leaf=_is_per_image)
    if next(it, None) is not None:
        raise ValueError("more per-image values than PerImage slots in the network transform")
    return filled


def per_image_value(x: Any) -> Any:
    """The array a field holds, whether given directly or as a filled :class:`PerImage`."""
    if _is_per_image(x):
        if x.value is None:
            raise ValueError("a PerImage slot was not filled: run the transform through a recipe that samples each "
                             "image on its own (StableDiffusion), or give one array shared by every image")
        return x.value
    return x


# ---- residuals from side networks ------------------------------------------------------------------

def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        if len(a) != len(b):
            raise ValueError(f"cannot add residual tuples of lengths {len(a)} and {len(b)}: the side networks "
                             "were built for different U-Nets")
        return tuple(_add(x, y) for x, y in zip(a, b))
    if a.shape != b.shape:
        raise ValueError(f"cannot add residuals of shapes {a.shape} and {b.shape}")
    return a + b


@pytree_dataclass
class Residuals:
    """What side networks hand the U-Net, NHWC, in the U-Net's order (``None``: nothing there).

    - ``down``: one per skip connection (``conv_in``, then each down block's layers and downsampler),
      added to the skips (ControlNet's ``down_block_additional_residuals``);
    - ``mid``: added to the mid block's output (ControlNet's ``mid_block_additional_residual``);
    - ``intra``: one per down block, added inside it to the output of its last layer (T2I-Adapter's
      ``down_intrablock_additional_residuals``).

    ``a + b`` sums two side networks' residuals; :meth:`scaled` multiplies by a scalar or per-sample scale.
    """

    down: tuple[Array, ...] | None = None
    mid: Array | None = None
    intra: tuple[Array, ...] | None = None

    def __add__(self, other: "Residuals") -> "Residuals":
        if not isinstance(other, Residuals):
            return NotImplemented
        return Residuals(_add(self.down, other.down), _add(self.mid, other.mid), _add(self.intra, other.intra))

    def scaled(self, scale: Any) -> "Residuals":
        """Every residual times ``scale`` (a scalar, or (B,) per sample)."""
        return jax.tree_util.tree_map(lambda r: r * expand_to(scale, r), self)


def add_residuals(cond: Mapping[str, Any], residuals: Residuals) -> dict:
    """``cond`` with ``residuals`` added to any ``cond["residuals"]`` already there."""
    previous = cond.get("residuals")
    return {**cond, "residuals": residuals if previous is None else previous + residuals}


def conditional_flag(cond: Any, batch: int) -> Array:
    """``cond["conditional"]`` (B,): 1 on the conditional rows of classifier-free guidance, 0 on the others."""
    flag = cond.get(CONDITIONAL) if isinstance(cond, Mapping) else None
    if flag is None:
        raise ValueError(f'a per-half transform needs cond["{CONDITIONAL}"] (B,): put ones in the conditioning '
                         "and zeros in the unconditional conditioning given to classifier_free")
    flag = jnp.asarray(flag)
    if flag.shape != (batch,):
        raise ValueError(f'cond["{CONDITIONAL}"] must have shape ({batch},), one flag per network row, '
                         f"got {flag.shape}")
    return flag


@pytree_dataclass
class SideNetwork:
    """``inner(x, t, cond + scale * side(x, t, cond))``: a side network's residuals (ControlNet, T2I-Adapter).

    ``side(x, t, cond) -> Residuals`` is a pytree callable run on the same network inputs; its residuals,
    times ``scale`` (a traced scalar, or (B,) per sample, tiled over the network batch), are added to
    ``cond["residuals"]`` (:func:`add_residuals`), so several side networks sum, as diffusers'
    ``MultiControlNetModel`` does. ``conditional_only`` (static) also multiplies by
    ``cond["conditional"]``, leaving the unconditional half of classifier-free guidance without them
    (diffusers' ControlNet guess mode, which runs the ControlNet on the conditional half only and hands
    the unconditional half zeros).
    """

    inner: Network
    side: Callable[..., Residuals]
    scale: Array
    conditional_only: bool = static_field(default=False)

    def __call__(self, x: Array, t: Array, cond: Any) -> Array:
        residuals = self.side(x, t, cond)
        if not isinstance(residuals, Residuals):
            raise TypeError("a side network must return jaxdiff.conditioning.Residuals, "
                            f"got {type(residuals).__name__}")
        scale = jnp.asarray(self.scale, jnp.float32)
        if scale.ndim:
            scale = tile_batch(scale, x.shape[0])
        if self.conditional_only:
            scale = scale * conditional_flag(cond, x.shape[0]).astype(jnp.float32)
        return self.inner(x, t, add_residuals(cond, residuals.scaled(scale)))


def side_network(side: Callable[..., Residuals], scale: Any = 1.0, *, conditional_only: bool = False) -> Transform:
    """Network transform adding ``scale * side(x, t, cond)`` to the network's residuals; see :class:`SideNetwork`."""
    return Transform(SideNetwork, dict(side=as_pytree_callable(side), scale=float_leaf(scale)),
                     (("conditional_only", bool(conditional_only)),))


# ---- concatenation conditioning --------------------------------------------------------------------

def tile_batch(a: Array, batch: int) -> Array:
    """``a`` (B, ...) repeated along the batch to ``batch`` rows (classifier-free guidance doubles the batch)."""
    if a.shape[0] == batch:
        return a
    if batch % a.shape[0]:
        raise ValueError(f"cannot tile a batch of {a.shape[0]} to {batch} network rows; give one entry per sample")
    return jnp.tile(a, (batch // a.shape[0],) + (1,) * (a.ndim - 1))


@pytree_dataclass
class Concat:
    """``inner(concat([x, extra], -1), t, cond)``: extra input channels (Palette, depth-to-image, inpainting U-Nets).

    ``extra`` (B, ..., c) is appended after the network-coordinate sample on the last (channel) axis, as
    diffusers does, and is the same for both halves of classifier-free guidance.
    """

    inner: Network
    extra: Array

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        extra = tile_batch(jnp.asarray(self.extra), x.shape[0]).astype(x.dtype)
        return self.inner(jnp.concatenate([x, extra], axis=-1), t, cond)


def concat(extra: Any) -> Transform:
    """Network transform appending ``extra`` channels to the sample; see :class:`Concat`."""
    return Transform(Concat, dict(extra=jnp.asarray(extra)))
