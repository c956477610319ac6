"""Dopri5 never returns an unfinished run as a sample: the exact-mixture check of issue 8."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdiff import mixtures, sampling, schedules
from jaxdiff.samplers import Dopri5

MIX = mixtures.ring_2d()
SIG = schedules.karras(2, 0.002, 80.0, capacity=4)  # one adaptive move 80 -> 0.002, then the denoising step
X = jax.random.normal(jax.random.key(0), (64, 2)) * 80.0


def test_running_out_of_max_steps_raises_and_flags_the_info():
    with pytest.raises(RuntimeError, match=r"dopri5 ran out of max_steps=3 on the move sigma 80 -> 0\.002 "
                                           r"\(reached sigma [0-9.]+\).*raise max_steps"):
        sampling.sample(MIX, Dopri5(max_steps=3), SIG, X)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        sampling.trajectory(MIX, Dopri5(max_steps=3), SIG, X)
    # inside jit nothing can raise: the flag is in the info and the output is not a sample
    out, info = sampling.sample_jit(MIX, Dopri5(max_steps=3), SIG, X, jax.random.key(0), None, False, 0)
    st = info.state
    assert bool(st.exhausted) and np.isnan(np.asarray(out)).all()
    s, s_next, reached = np.asarray(st.stalled)
    assert s == pytest.approx(80.0) and s_next == pytest.approx(0.002) and s_next < reached < s
    assert int(st.accepted) + int(st.rejected) == 3


def test_a_finished_run_is_unflagged_and_lands_on_the_mixture():
    out, info = sampling.sample(MIX, Dopri5(), SIG, X, return_info=True)
    assert not bool(info.state.exhausted)
    # exact ODE solve from sigma 80: every sample ends on a ring mode (radius 4, std 0.3)
    r = np.linalg.norm(np.asarray(out), axis=-1)
    assert np.all(np.abs(r - 4.0) < 1.5), r
