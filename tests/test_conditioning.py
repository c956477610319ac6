"""Network transforms (jaxdiff.conditioning): the step index the runner hands controls, residual sums, concat."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import conditioning as C
from jaxdiff import guidance, sampling, schedules
from jaxdiff._pytree import pytree_dataclass


@pytree_dataclass
class StepReporter:
    """A denoiser whose output is the step index it was handed (so x after a step is that index)."""

    step: C.StepIndex

    def __call__(self, x, sigma, cond=None):
        return jnp.zeros_like(x) + self.step.value.astype(x.dtype)


@pytree_dataclass
class TakeDenoised:
    """A sampler whose step returns the denoiser's output: the trajectory shows what each step saw."""

    def init(self, x):
        return ()

    def step(self, denoise, state, x, sigma, sigma_next, key):
        return denoise(x, sigma), state


def test_the_runner_hands_every_step_its_index():
    sig = schedules.karras(6, 0.1, 10.0)
    xs, _ = sampling.trajectory(StepReporter(C.StepIndex()), TakeDenoised(), sig, jnp.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(xs[1:, 0, 0]), np.arange(6))


def test_the_step_index_reaches_a_control_inside_the_conditioning_and_inside_the_compiled_loop():
    @pytree_dataclass
    class FromCond:
        def __call__(self, x, sigma, cond):
            return jnp.zeros_like(x) + cond["step"].value.astype(x.dtype)

    sig = schedules.karras(5, 0.1, 10.0, capacity=8)
    out = sampling.sample(FromCond(), TakeDenoised(), sig, jnp.ones((1, 2)), cond={"step": C.StepIndex()}, start=1)
    assert float(out[0, 0]) == 4.0  # the last step run is index count - 1


def test_at_step_is_the_identity_without_a_step_index():
    tree = {"a": jnp.ones(2), "b": (1.0, None)}
    assert jax.tree_util.tree_structure(C.at_step(tree, 3)) == jax.tree_util.tree_structure(tree)


def test_residuals_sum_fieldwise_and_absent_fields_count_as_zero():
    a = C.Residuals(down=(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 1, 1, 3))), mid=jnp.ones((1, 1, 1, 3)))
    b = C.Residuals(down=(2 * jnp.ones((1, 2, 2, 3)), 3 * jnp.ones((1, 1, 1, 3))),
                    intra=(jnp.full((1, 2, 2, 3), 5.0),))
    s = a + b
    np.testing.assert_array_equal(s.down[0], 3.0)
    np.testing.assert_array_equal(s.down[1], 4.0)
    np.testing.assert_array_equal(s.mid, 1.0)
    np.testing.assert_array_equal(s.intra[0], 5.0)
    with pytest.raises(ValueError, match="lengths 2 and 1"):
        a + C.Residuals(down=(jnp.ones((1, 2, 2, 3)),))


def test_residuals_scale_per_sample():
    r = C.Residuals(mid=jnp.ones((2, 1, 1, 3))).scaled(jnp.array([0.5, 2.0]))
    np.testing.assert_array_equal(r.mid[:, 0, 0, 0], [0.5, 2.0])
    cond = C.add_residuals(C.add_residuals({"context": 1}, r), r)
    np.testing.assert_array_equal(cond["residuals"].mid[:, 0, 0, 0], [1.0, 4.0])


def test_concat_appends_channels_tiled_over_classifier_free_guidance():
    seen = {}

    @pytree_dataclass
    class Net:
        def __call__(self, x, t, cond):
            seen["x"] = x
            return x[..., :2]

    extra = jnp.arange(4.0).reshape(1, 2, 2, 1)
    net = C.apply(Net(), C.concat(extra))
    den = guidance.apply(lambda_denoiser(net), guidance.classifier_free(2.0, {"c": jnp.zeros((1,))}))
    den(jnp.ones((1, 2, 2, 2)), jnp.ones(()), {"c": jnp.ones((1,))})
    assert seen["x"].shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(seen["x"][0, ..., 2], seen["x"][1, ..., 2])
    np.testing.assert_array_equal(seen["x"][0, ..., 2], extra[0, ..., 0])


def lambda_denoiser(net):
    @pytree_dataclass
    class Den:
        net: object

        def __call__(self, x, sigma, cond):
            return self.net(x, sigma, cond)

    return Den(net)


def test_one_chain_for_both_levels():
    assert C.chain is guidance.chain and C.apply is guidance.apply
    inner = C.chain(C.concat(jnp.zeros((1, 1))))
    outer = C.chain(inner, None, C.concat(jnp.ones((1, 1))))
    assert len(outer.transforms) == 2  # a chain inside a chain is flattened
