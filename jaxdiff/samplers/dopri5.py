"""Adaptive Dormand-Prince 5(4) solver of the probability-flow ODE."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.samplers._base import DenoiseFn, as_leaves, check_option

Array = jax.Array

# Dormand & Prince 1980, Table 2 (DOPRI5): stage matrix, 5th-order weights and (5th - 4th) error weights.
_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


class Dopri5State(NamedTuple):
    """Running totals over the whole run: function evaluations, accepted and rejected steps, next step size.

    ``exhausted`` is True once a move ran out of ``max_steps`` before reaching its level; ``stalled`` is
    then ``(sigma, sigma_next, sigma reached)`` of that move (zeros otherwise).
    """

    nfe: Array
    accepted: Array
    rejected: Array
    h: Array
    exhausted: Array
    stalled: Array


@pytree_dataclass
class Dopri5:
    """Dormand-Prince 5(4) with PI step-size control on the probability-flow ODE (Karras et al. 2022, eq. 3).

    Within one ``step`` from sigma to sigma' it integrates in ``s = log(sigma / sigma(s))``, where the
    ODE reads ``dx/ds = D(x, sigma e^{-s}) - x``: the field stays O(|x - D|) at every noise level, so
    one tolerance and step size suit levels from 80 to 0.002, and a geometric schedule is uniform in s.
    The error norm is the RMS of ``err / (atol + rtol max(|x|, |x'|))`` per sample, maxed over the batch;
    steps are accepted when it is <= 1, and the next step is ``h (safety err^{-0.7/5} err_prev^{0.4/5})``
    clipped to [0.2, 10] h (Hairer & Wanner, Sec. IV.2; no growth after a rejection). The step to
    sigma' = 0 is one denoising step ``x' = D(x, sigma)``. NFE and step counts accumulate in the state.

    ``max_steps`` bounds the attempted steps of each move. A move that runs out of them has not reached
    its level, so its result is not a sample: the state's ``exhausted`` flag is set, ``x`` becomes NaN
    (the remaining moves are skipped) and :func:`jaxdiff.sampling.sample` raises ``RuntimeError``
    naming the move (:meth:`failure`); raise ``max_steps`` or loosen ``rtol``/``atol``.
    """

    rtol: Array | float = 1e-4
    atol: Array | float = 1e-4
    h0: Array | float = 0.1
    safety: Array | float = 0.9
    max_steps: Array | int = 1000

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "h0"):
            check_option(name, getattr(self, name), lambda v: v > 0, "positive")
        as_leaves(self, floats=("rtol", "atol", "h0", "safety"), ints=("max_steps",))

    def init(self, x: Array) -> Dopri5State:
        zero = jnp.zeros((), jnp.int32)
        return Dopri5State(zero, zero, zero, jnp.asarray(self.h0, x.dtype), jnp.zeros((), bool),
                           jnp.zeros((3,), x.dtype))

    def failure(self, state: Dopri5State) -> str | None:
        """A one-line error when the run did not finish (host-side, on a concrete final state), else None."""
        if not bool(state.exhausted):
            return None
        s, s_next, reached = (float(v) for v in state.stalled)
        return (f"dopri5 ran out of max_steps={int(self.max_steps)} on the move sigma {s:g} -> {s_next:g} "
                f"(reached sigma {reached:g}), so the run is unfinished; raise max_steps or loosen rtol/atol")

    def step(self, denoise: DenoiseFn, state: Dopri5State, x: Array, sigma: Array, sigma_next: Array,
             key: Array) -> tuple[Array, Dopri5State]:
        def final() -> tuple[Array, Dopri5State]:
            return denoise(x, sigma), state._replace(nfe=state.nfe + 1)

        def skip() -> tuple[Array, Dopri5State]:  # an earlier move was unfinished: x is already NaN
            return x, state

        branch = jnp.where(state.exhausted, 2, jnp.where(sigma_next > 0, 0, 1))
        return jax.lax.switch(branch, (lambda: self._integrate(denoise, state, x, sigma, sigma_next), final, skip))

    def _integrate(self, denoise: DenoiseFn, state: Dopri5State, x: Array, sigma: Array,
                   sigma_next: Array) -> tuple[Array, Dopri5State]:
        f = lambda s, y: denoise(y, sigma * jnp.exp(-s)) - y  # noqa: E731
        end = jnp.log(sigma) - jnp.log(sigma_next)
        axes = tuple(range(1, x.ndim))

        def attempt(carry: tuple) -> tuple:
            s, y, k1, h, err_prev, st = carry
            h = jnp.minimum(h, end - s)
            ks = [k1]
            for a, c in zip(_A, _C):
                ks.append(f(s + c * h, y + h * sum(ai * ki for ai, ki in zip(a, ks))))
            y_new = y + h * sum(b * k for b, k in zip(_B, ks))
            k7 = f(s + h, y_new)  # first-same-as-last: the next stage 1
            err = h * sum(e * k for e, k in zip(_E, ks + [k7]))
            scale = self.atol + self.rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
            norm = jnp.max(jnp.sqrt(jnp.mean((err / scale) ** 2, axis=axes)))
            norm = jnp.maximum(norm, 1e-10)
            ok = norm <= 1.0
            grow = jnp.clip(self.safety * norm ** (-0.7 / 5) * err_prev ** (0.4 / 5), 0.2, 10.0)
            shrink = jnp.clip(self.safety * norm ** (-1 / 5), 0.2, 1.0)
            s_new = jnp.where(h >= end - s, end, s + h)
            st = st._replace(nfe=st.nfe + 6, accepted=st.accepted + ok, rejected=st.rejected + ~ok)
            return (jnp.where(ok, s_new, s), jnp.where(ok, y_new, y), jnp.where(ok, k7, k1),
                    h * jnp.where(ok, grow, shrink), jnp.where(ok, norm, err_prev), st)

        def unfinished(carry: tuple) -> Array:
            s, st = carry[0], carry[5]
            return (s < end) & (st.accepted + st.rejected < state.accepted + state.rejected + self.max_steps)

        carry = (jnp.zeros_like(end), x, f(0.0, x), state.h, jnp.asarray(1e-4, x.dtype),
                 state._replace(nfe=state.nfe + 1))
        s, y, _, h, _, st = jax.lax.while_loop(unfinished, attempt, carry)
        stuck = s < end
        stalled = jnp.stack([sigma, sigma_next, sigma * jnp.exp(-s)]).astype(x.dtype)
        st = st._replace(h=jnp.asarray(h, x.dtype), exhausted=stuck,
                         stalled=jnp.where(stuck, stalled, st.stalled))
        return jnp.where(stuck, jnp.full_like(y, jnp.nan), y), st
