"""The runner: one jit-compiled loop over a padded schedule with a traced step count.

``sample(denoiser, sampler, sigmas, x, key, cond)`` runs ``sigmas.count`` steps of ``sampler`` inside a
single ``lax.fori_loop``. The denoiser, sampler, schedule, key and conditioning are all traced, so
changing the number of steps (up to the schedule's capacity), a guidance scale, eta, the seed or the
prompt reuses the same compiled program. Per-step keys are ``fold_in(key, i)``.

Reverse-mode differentiation (``jax.grad`` of a loss of the sample) needs ``differentiable=True``: a
``lax.scan`` over the capacity with ``jax.checkpoint`` per step (see :func:`sample`). The default
``fori_loop`` with a traced step count is a ``while_loop``, which JAX cannot transpose; asking for a
gradient through it raises an error naming the differentiable path. Forward mode (``jax.jvp``) works
on both paths.

A low-precision ``x`` (bfloat16, float16) is integrated in float32 and the result is returned in
``x``'s dtype: a run accumulates many small updates, which an 8-bit mantissa would round away.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import progress as _progress
from jaxdiff.conditioning import at_step
from jaxdiff.samplers._base import prepare as _prepare
from jaxdiff.schedules import Sigmas, check_sigmas

Array = jax.Array
EVALUATE_AT = ("current", "target")
REVERSE_MODE_ERROR = ("reverse-mode differentiation (jax.grad / jax.vjp) cannot run through the default sampling loop "
                      "(a while_loop over the traced step count); use jaxdiff.sample(..., differentiable=True) "
                      "(jaxdiff.sampling.sample_differentiable), a scan with jax.checkpoint per step")


class SampleInfo(NamedTuple):
    """What a run reports besides the sample: the sampler's final state and the first non-finite step (-1: none).

    A sampler may report a failure through its state (Dopri5's ``exhausted`` flag when ``max_steps``
    ran out); :func:`sample` raises on it, and :func:`sample_jit` callers read it here.
    """

    state: Any
    first_nonfinite_step: Array


def initial_noise(key: Array, shape: tuple[int, ...], sigma_max: Array, sigma_data: float = 0.0,
                  dtype: Any = jnp.float32) -> Array:
    """Start of a run: ``noise * sqrt(sigma_max^2 + sigma_data^2)``.

    ``sigma_data = 0`` gives k-diffusion's ``noise * sigma_max``; ``sigma_data = 1`` is the exact
    marginal of a VP model at its last step (``x_T ~ N(0, I)`` in VP coordinates), which the
    diffusers schedulers use (``init_noise_sigma``).
    """
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(jnp.asarray(sigma_max) ** 2 + sigma_data**2)


# ---- shared pieces -----------------------------------------------------------------------------

def _work_dtype(x: Array) -> Any:
    """The dtype a run integrates in: x's own float dtype, at least float32."""
    return jnp.promote_types(x.dtype, jnp.float32)


@jax.custom_vjp
def _no_reverse(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _no_reverse_fwd(fn: Callable[..., Any], *args: Any) -> tuple[Any, None]:
    raise TypeError(REVERSE_MODE_ERROR)


def _no_reverse_bwd(res: None, ct: Any) -> tuple:
    raise TypeError(REVERSE_MODE_ERROR)


_no_reverse.defvjp(_no_reverse_fwd, _no_reverse_bwd)


def _guard_reverse(fn: Callable[..., Any], guard: bool, *args: Any) -> Any:
    """``fn(*args)``, raising :data:`REVERSE_MODE_ERROR` under reverse-mode autodiff when ``guard``.

    The guard is a ``custom_vjp`` whose forward rule raises, so ``jax.grad`` fails with this message
    wherever it is applied (directly, around an outer ``jit`` or ``checkpoint``) instead of JAX's
    while_loop error. A custom_vjp cannot be pushed forward, so callers turn the guard off when their
    inputs are already forward-mode tracers (``jax.jvp`` then differentiates the loop itself).
    """
    if not guard:
        return fn(*args)
    return _no_reverse(jax.tree_util.Partial(fn), *args)


def _forward_mode(*trees: Any) -> bool:
    """Whether any leaf is a forward-mode (``jax.jvp``) tracer."""
    try:
        from jax._src.interpreters.ad import JVPTracer  # no public name for the trace type
    except ImportError:  # pragma: no cover - a later JAX moved it: keep the guard (forward mode then errors)
        return False
    return any(isinstance(leaf, JVPTracer) for leaf in jax.tree_util.tree_leaves(trees))


def _is_concrete(v: Any) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _check_denoiser(denoiser: Any) -> None:
    """A denoiser is traced as a pytree: a plain function or lambda is a leaf JAX cannot trace."""
    if not callable(denoiser):
        raise TypeError(f"the denoiser must be callable as D(x, sigma, cond), got {type(denoiser).__name__}")
    leaves = jax.tree_util.tree_leaves(denoiser)
    if len(leaves) == 1 and leaves[0] is denoiser:  # a leaf itself (a field-less pytree class has no leaves)
        raise TypeError(f"the denoiser is a plain Python callable ({type(denoiser).__name__} "
                        f"{getattr(denoiser, '__name__', '')!s}), which jit cannot trace; wrap it as "
                        "jax.tree_util.Partial(fn, *arrays) (arrays as arguments, not closed over) or make it a "
                        "@jaxdiff.pytree_dataclass whose arrays are fields")


def _check_x(x: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {jnp.result_type(x)}; "
                        "cast it with x.astype(jnp.float32)")


def _check_cond(x: Array, cond: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(cond):
        shape = getattr(leaf, "shape", ())
        if len(shape) >= 1 and shape[0] != x.shape[0]:
            raise ValueError(f"conditioning has batch size {shape[0]} but x has batch size {x.shape[0]}; "
                             "give one conditioning entry per sample (jnp.broadcast_to / jnp.repeat)")


def _check_start(sigmas: Sigmas, start: Any) -> None:
    if _is_concrete(start) and _is_concrete(sigmas.count) and not 0 <= int(start) < int(sigmas.count):
        raise ValueError(f"start must be in [0, {int(sigmas.count)}) for this schedule, got {int(start)}")


def _raise_on_failure(sampler: Any, state: Any) -> None:
    """Raise when the sampler reports (through its final state) that it did not finish the run."""
    failure = getattr(sampler, "failure", None)
    if failure is None or not all(_is_concrete(v) for v in jax.tree_util.tree_leaves(state)):
        return
    message = failure(state)
    if message:
        raise RuntimeError(message)


def _raise_on_nonfinite(bad: Array, sigmas: Sigmas) -> None:
    if _is_concrete(bad) and int(bad) >= 0:
        i = int(bad)
        s = np.asarray(sigmas.values)
        raise FloatingPointError(f"sampling produced NaN/Inf first at step {i} (sigma {s[i]:g} -> {s[i + 1]:g}); "
                                 "check the denoiser's output at that noise level, the dtype, or lower the guidance scale")


def _step_fn(denoiser: Any, sampler: Any, sigmas: Sigmas, key: Array, cond: Any, start: Any = 0) -> Callable:
    """One step ``(x, state, i) -> (x, state)`` with x kept in its starting dtype."""
    def step(x: Array, state: Any, i: Array) -> tuple[Array, Any]:
        den, c = at_step((denoiser, cond), i, start, sigmas.count)  # controls that act on chosen steps read them
        denoise = lambda x_, s_: den(x_, s_, c)  # noqa: E731
        x_new, state_new = sampler.step(denoise, state, x, sigmas.values[i], sigmas.values[i + 1],
                                        jax.random.fold_in(key, i))
        return x_new.astype(x.dtype), state_new

    return step


# ---- the runner --------------------------------------------------------------------------------

def _fori(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array, cond: Any, start: Any,
          progress: bool) -> tuple[Array, SampleInfo]:
    count = sigmas.count
    sampler = _prepare(sampler, sigmas)
    step = _step_fn(denoiser, sampler, sigmas, key, cond, start)

    def body(i: Array, carry: tuple[Array, Any, Array]) -> tuple[Array, Any, Array]:
        x, state, bad = carry
        x, state = step(x, state, i)
        bad = jnp.where((bad < 0) & ~jnp.all(jnp.isfinite(x)), i, bad)
        if progress:
            _progress.report(i - start, count - start)
        return x, state, bad

    carry = (x, sampler.init(x), jnp.asarray(-1, jnp.int32))
    x, state, bad = jax.lax.fori_loop(jnp.asarray(start, jnp.int32), count, body, carry)
    return x, SampleInfo(state, bad)


def _loop(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array, cond: Any,
          progress: bool, start: Array | int = 0, reverse_guard: bool = True) -> tuple[Array, SampleInfo]:
    dtype = x.dtype
    x, info = _guard_reverse(lambda *a: _fori(*a, progress), reverse_guard,
                             denoiser, sampler, sigmas, x.astype(_work_dtype(x)), key, cond, start)
    return x.astype(dtype), info


sample_jit = jax.jit(_loop, static_argnames=("progress", "reverse_guard"))
"""The pure compiled loop: ``sample_jit(denoiser, sampler, sigmas, x, key, cond, progress, start)``."""


def _scan(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array, cond: Any,
          progress: bool, start: Array | int = 0) -> tuple[Array, SampleInfo]:
    dtype, count, start = x.dtype, sigmas.count, jnp.asarray(start, jnp.int32)
    sampler = _prepare(sampler, sigmas)
    step = jax.checkpoint(_step_fn(denoiser, sampler, sigmas, key, cond, start))

    def body(carry: tuple[Array, Any, Array], i: Array) -> tuple[tuple[Array, Any, Array], None]:
        x, state, bad = carry
        active = (i >= start) & (i < count)
        x, state = jax.lax.cond(active, step, lambda x_, s_, i_: (x_, s_), x, state, i)
        bad = jnp.where(active & (bad < 0) & ~jnp.all(jnp.isfinite(x)), i, bad)
        if progress:
            jax.lax.cond(active, lambda: _progress.report(i - start, count - start), lambda: None)
        return (x, state, bad), None

    x = x.astype(_work_dtype(x))
    carry = (x, sampler.init(x), jnp.asarray(-1, jnp.int32))
    (x, state, bad), _ = jax.lax.scan(body, carry, jnp.arange(sigmas.capacity, dtype=jnp.int32))
    return x.astype(dtype), SampleInfo(state, bad)


sample_differentiable_jit = jax.jit(_scan, static_argnames=("progress",))
"""The differentiable compiled loop (same arguments as :data:`sample_jit`, without ``reverse_guard``)."""


def sample(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array | int = 0, cond: Any = None, *,
           start: int | Array = 0, progress: bool = False, check_finite: bool = True,
           return_info: bool = False, differentiable: bool = False) -> Array | tuple[Array, SampleInfo]:
    """Run ``sampler`` from ``x`` (a sample at noise level ``sigmas.values[start]``) down the schedule.

    ``start`` skips the first steps (SDEdit / image-to-image strength). With ``check_finite`` a run that
    produced NaN or Inf raises ``FloatingPointError`` naming the step where it began; a sampler that
    reports an unfinished run (Dopri5 out of ``max_steps``) raises ``RuntimeError``. Inside another
    ``jax.jit`` the checks that need concrete values are skipped; use :data:`sample_jit` there and read
    :class:`SampleInfo`.

    ``differentiable=True`` supports ``jax.grad`` through the run (with respect to ``x``, guidance
    scales, conditioning, network parameters, sampler options or the levels): a ``lax.scan`` over the
    schedule's *capacity*, each step under ``jax.checkpoint`` and skipped by ``lax.cond`` outside
    ``[start, count)``, so the step count stays a traced value and the program is shared across step
    counts. The backward pass stores one ``(x, sampler state)`` per scanned step and recomputes each
    step's denoiser activations, so memory is O(capacity x state): build the schedule with
    ``capacity=steps`` to pay only for the steps run. The forward pass costs the same as the default.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    _check_denoiser(denoiser)
    _check_x(x)
    if _is_concrete(sigmas.count) and _is_concrete(sigmas.values):
        check_sigmas(sigmas)
    _check_start(sigmas, start)
    _check_cond(x, cond)
    if differentiable:
        out, info = sample_differentiable_jit(denoiser, sampler, sigmas, x, key, cond, progress, start)
    else:
        guard = not _forward_mode(denoiser, sampler, sigmas, x, key, cond, start)
        out, info = sample_jit(denoiser, sampler, sigmas, x, key, cond, progress, start, guard)
    _raise_on_failure(sampler, info.state)
    if check_finite:
        _raise_on_nonfinite(info.first_nonfinite_step, sigmas)
    return (out, info) if return_info else out


def sample_differentiable(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array | int = 0,
                          cond: Any = None, **kwargs: Any) -> Array | tuple[Array, SampleInfo]:
    """:func:`sample` with ``differentiable=True``: reverse-mode autodiff through the run."""
    return sample(denoiser, sampler, sigmas, x, key, cond, differentiable=True, **kwargs)


# ---- trajectories ------------------------------------------------------------------------------

def _trajectory(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array, cond: Any,
                length: int) -> tuple[Array, Any]:
    dtype = x.dtype
    sampler = _prepare(sampler, sigmas)
    step = _step_fn(denoiser, sampler, sigmas, key, cond)

    def body(carry: tuple[Array, Any], i: Array) -> tuple[tuple[Array, Any], Array]:
        carry = step(carry[0], carry[1], i)
        return carry, carry[0].astype(dtype)

    x32 = x.astype(_work_dtype(x))
    (_, state), xs = jax.lax.scan(body, (x32, sampler.init(x32)), jnp.arange(length, dtype=jnp.int32))
    return jnp.concatenate([x[None], xs]), state


trajectory_jit = jax.jit(_trajectory, static_argnames=("length",))
"""``trajectory_jit(denoiser, sampler, sigmas, x, key, cond, length)``: ``length`` (static) steps."""


def trajectory(denoiser: Any, sampler: Any, sigmas: Sigmas, x: Array, key: Array | int = 0,
               cond: Any = None) -> tuple[Array, Any]:
    """Like :func:`sample` but keeping every step: ``(xs, final_state)`` with ``xs[i]`` at ``sigmas.values[i]``.

    ``xs`` has ``count + 1`` entries, whatever the schedule's capacity: the number of steps is a static
    length here (a ``lax.scan`` of exactly ``count`` steps), so each step count compiles its own
    program. Same per-step keys as :func:`sample`; differentiable in reverse mode.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    _check_denoiser(denoiser)
    _check_x(x)
    check_sigmas(sigmas)
    _check_cond(x, cond)
    xs, state = trajectory_jit(denoiser, sampler, sigmas, x, key, cond, int(sigmas.count))
    _raise_on_failure(sampler, state)
    return xs, state


# ---- DDIM inversion ----------------------------------------------------------------------------

def _invert_step(denoise: Callable[[Array, Array], Array], x: Array, sigma: Array, sigma_next: Array,
                 evaluate_at: str) -> Array:
    """One deterministic DDIM move up from ``sigma`` to ``sigma_next``: ``x + (sigma_next - sigma) eps_hat``.

    ``eps_hat = (x - D(x, s)) / s`` with ``s = sigma_next`` ("target") or ``s = sigma`` ("current"; from
    ``sigma = 0``, where eps_hat is undefined, the target level).
    """
    s = sigma_next if evaluate_at == "target" else jnp.where(sigma > 0, sigma, sigma_next)
    eps = (x - denoise(x, s)) / s
    return (x + (sigma_next - sigma) * eps).astype(x.dtype)


def _invert_loop(denoiser: Any, x0: Array, sigmas: Sigmas, cond: Any, start: Array, evaluate_at: str) -> Array:
    count, v = sigmas.count, sigmas.values

    def body(j: Array, x: Array) -> Array:
        den, c = at_step((denoiser, cond), count - j - 1, start, count)  # the downward step this move mirrors
        return _invert_step(lambda x_, s_: den(x_, s_, c), x, v[count - j], v[count - j - 1], evaluate_at)

    return jax.lax.fori_loop(0, count - start, body, x0)


def _invert(denoiser: Any, x0: Array, sigmas: Sigmas, cond: Any, start: Array, evaluate_at: str = "target",
            reverse_guard: bool = True) -> Array:
    out = _guard_reverse(lambda *a: _invert_loop(*a, evaluate_at), reverse_guard,
                         denoiser, x0.astype(_work_dtype(x0)), sigmas, cond, start)
    return out.astype(x0.dtype)


invert_jit = jax.jit(_invert, static_argnames=("evaluate_at", "reverse_guard"))


def invert(denoiser: Any, x0: Array, sigmas: Sigmas, cond: Any = None, *, start: int | Array = 0,
           evaluate_at: str = "current") -> Array:
    """DDIM inversion (Song et al. 2021, Sec. 4.3; Mokady et al. 2023): run DDIM (eta = 0) *up* the used levels.

    Starts from ``x0`` at the schedule's final level (``sigmas.values[count]``, usually 0) and returns the
    latent at ``sigmas.values[start]``, so ``sample(denoiser, DDIM(), sigmas, invert(...), start=start)``
    reconstructs ``x0`` up to the discretisation error. Each move from ``sigma`` up to ``sigma'`` is
    ``x' = x + (sigma' - sigma) (x - D(x, s)) / s``, with the denoiser evaluated at

    - ``evaluate_at="current"`` (default): ``s = sigma``, the level the sample is at (an explicit Euler
      step of the probability-flow ODE upward; the first move, from sigma = 0, uses ``sigma'``). On
      an exact Gaussian mixture it round-trips 3-4x closer than "target" at 50 steps (figures in
      ``benchmarks/results/solver_accuracy.json``), because the denoiser sees a sample whose noise
      level matches its argument.
    - ``evaluate_at="target"``: ``s = sigma'``, diffusers' ``DDIMInverseScheduler`` convention (the
      level the downward DDIM step will use, on the wrong sample); use it for parity with diffusers
      inversions (null-text inversion, pix2pix-zero recipes).
    """
    if evaluate_at not in EVALUATE_AT:
        raise ValueError(f"evaluate_at must be one of {', '.join(EVALUATE_AT)}, got {evaluate_at!r}")
    _check_denoiser(denoiser)
    _check_x(x0)
    check_sigmas(sigmas)
    _check_start(sigmas, start)
    _check_cond(x0, cond)
    guard = not _forward_mode(denoiser, x0, sigmas, cond, start)
    return invert_jit(denoiser, x0, sigmas, cond, jnp.asarray(start, jnp.int32), evaluate_at, guard)
