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

    @pytree_dataclass
    class Span:
        def __call__(self, x, sigma, cond):
            step = cond["step"]
            return jnp.stack([step.first, step.count]).astype(x.dtype)[None]

    sig = schedules.karras(5, 0.1, 10.0, capacity=8)
    out = sampling.sample(FromCond(), TakeDenoised(), sig, jnp.ones((1, 2)), cond={"step": C.StepIndex()}, start=1)
    assert float(out[0, 0]) == 4.0  # the last step run is index count - 1
    span = sampling.sample(Span(), TakeDenoised(), sig, jnp.ones((1, 2)), cond={"step": C.StepIndex()}, start=1)
    np.testing.assert_array_equal(np.asarray(span[0]), [1.0, 5.0])  # the run's first step and step count


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


# ---- side networks ---------------------------------------------------------------------------------

@pytree_dataclass
class MidReader:
    """A network whose output is its input plus the mid residual it was handed (0 without one)."""

    def __call__(self, x, t, cond):
        r = cond.get("residuals")
        return x if r is None or r.mid is None else x + r.mid


@pytree_dataclass
class ConstantSide:
    """A side network handing ``value`` (B, 1, 1, 1) as the mid residual, whatever the inputs."""

    value: jax.Array

    def __call__(self, x, t, cond):
        return C.Residuals(mid=jnp.broadcast_to(self.value, x.shape))


def test_side_networks_sum_scaled_and_per_sample_scales_tile_over_guidance():
    x = jnp.zeros((4, 1, 1, 1))  # 2 samples, doubled by classifier-free guidance
    net = C.apply(MidReader(), C.side_network(ConstantSide(jnp.ones(())), jnp.array([2.0, 3.0])),
                  C.side_network(ConstantSide(10 * jnp.ones(())), 0.5))
    out = net(x, 0.0, {"context": None})
    np.testing.assert_array_equal(np.asarray(out)[:, 0, 0, 0], [7.0, 8.0, 7.0, 8.0])  # 1*[2,3,2,3] + 10*0.5


def test_conditional_only_leaves_the_unconditional_half_without_residuals():
    net = C.apply(MidReader(), C.side_network(ConstantSide(jnp.ones(())), 4.0, conditional_only=True))
    den = guidance.apply(lambda x, s, cond: net(x, s, cond),
                         guidance.classifier_free(1.0, {C.CONDITIONAL: jnp.zeros(2)}))
    # at scale 1 guidance returns the conditional half, which got the residual ...
    np.testing.assert_array_equal(np.asarray(den(jnp.zeros((2, 1, 1, 1)), 1.0, {C.CONDITIONAL: jnp.ones(2)})), 4.0)
    # ... and at scale 0 the unconditional half, which did not
    den0 = guidance.apply(lambda x, s, cond: net(x, s, cond),
                          guidance.classifier_free(0.0, {C.CONDITIONAL: jnp.zeros(2)}))
    np.testing.assert_array_equal(np.asarray(den0(jnp.zeros((2, 1, 1, 1)), 1.0, {C.CONDITIONAL: jnp.ones(2)})), 0.0)


def test_side_network_errors_are_clear():
    needs_flag = C.apply(MidReader(), C.side_network(ConstantSide(jnp.ones(())), conditional_only=True))
    with pytest.raises(ValueError, match=r'needs cond\["conditional"\]'):
        needs_flag(jnp.zeros((2, 1, 1, 1)), 0.0, {"context": None})
    with pytest.raises(ValueError, match=r'must have shape \(2,\)'):
        needs_flag(jnp.zeros((2, 1, 1, 1)), 0.0, {C.CONDITIONAL: jnp.ones(3)})
    not_residuals = C.apply(MidReader(), C.side_network(lambda x, t, cond: x))
    with pytest.raises(TypeError, match="must return jaxdiff.conditioning.Residuals"):
        not_residuals(jnp.zeros((2, 1, 1, 1)), 0.0, {})


def test_side_network_scale_is_a_traced_leaf_and_conditional_only_static():
    f = jax.jit(lambda net, x: net(x, 0.0, {C.CONDITIONAL: jnp.ones(2)}))
    make = lambda s, only=False: C.apply(MidReader(), C.side_network(ConstantSide(jnp.ones(())), s,  # noqa: E731
                                                                     conditional_only=only))
    x = jnp.zeros((2, 1, 1, 1))
    outs = [float(f(make(s), x)[0, 0, 0, 0]) for s in (1.0, 2, np.float32(3.0), jnp.asarray(4.0))]
    assert outs == [1.0, 2.0, 3.0, 4.0] and f._cache_size() == 1
    f(make(1.0, True), x)
    assert f._cache_size() == 2  # the static option is part of the program
