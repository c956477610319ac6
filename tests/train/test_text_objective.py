"""The text-conditioned diffusion objective (Stable Diffusion's U-Net training, Rombach et al. 2022 eq. 3):
closed-form expected losses on Gaussian data, caption dropout (Ho & Salimans 2022), and the train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import ddpm_loss
from jaxdiff.schedules import alphas_cumprod, vp_betas
from jaxdiff.train import OptimizerConfig, Trainer
from jaxdiff.train.objectives import TextDiffusionObjective, drop_context

AC = jnp.asarray(alphas_cumprod(vp_betas("scaled_linear", 1000, 0.00085, 0.012)), jnp.float32)


@pytree_dataclass
class OptimalEps:
    """For data x0 ~ N(0, I): x_t ~ N(0, I) and E[eps | x_t] = sqrt(1 - abar_t) x_t, leaving a residual
    variance abar_t per element; plus the context's mean as an offset (0 for captions, 1 for the null prompt)."""

    ac: jax.Array

    def __call__(self, x, t, context):
        abar = jnp.interp(t, jnp.arange(self.ac.shape[0], dtype=jnp.float32), self.ac)
        offset = jnp.mean(context, axis=(1, 2))
        return jnp.sqrt(1 - abar)[:, None] * x + offset[:, None]


def _objective(p: float) -> TextDiffusionObjective:
    return TextDiffusionObjective(ddpm_loss(AC), DiscreteVPDenoiser(None, AC, "epsilon"), jnp.ones((3, 2)), p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_expected_loss_of_the_optimal_predictor_is_closed_form(p):
    """E loss = E_t[abar_t] (the irreducible epsilon error, t uniform on the 1000 steps) + p (a dropped caption's
    offset of 1 adds 1 to the squared error): checks the noise levels, the epsilon weighting, that the context
    reaches the network and that captions are dropped with probability p."""
    n = 16384
    x0 = jax.random.normal(jax.random.PRNGKey(0), (n, 8))
    batch = {"x": x0, "context": jnp.zeros((n, 3, 2))}
    loss, _ = _objective(p)(OptimalEps(AC), batch, jax.random.PRNGKey(1))
    assert loss.shape == (n,)
    np.testing.assert_allclose(float(jnp.mean(loss)), float(jnp.mean(AC)) + p, atol=0.015)


def test_drop_context_replaces_whole_rows_with_the_null_states():
    n, p = 20000, 0.1
    context = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None], (n, 4, 3))
    null = jnp.full((4, 3), -1.0)
    out = np.asarray(drop_context(context, null, jax.random.PRNGKey(3), p))
    dropped = np.all(out == -1.0, axis=(1, 2))
    kept = np.all(out == np.asarray(context), axis=(1, 2))
    assert np.all(dropped | kept)  # never a mix inside a row
    assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert not np.any(drop_context(context, null, jax.random.PRNGKey(3), 0.0) == -1.0)


def test_objective_checks_its_settings():
    with pytest.raises(ValueError, match="probability"):
        _objective(1.0)
    with pytest.raises(ValueError, match="null_context"):
        TextDiffusionObjective(ddpm_loss(AC), DiscreteVPDenoiser(None, AC), jnp.ones((1, 3, 2)))
    with pytest.raises(ValueError, match="context"):
        _objective(0.1)(OptimalEps(AC), {"x": jnp.ones((2, 8)), "context": jnp.ones((2, 5, 2))}, jax.random.PRNGKey(0))


class TinyTextNet(nnx.Module):
    """net(x, t, context): a per-pixel linear map plus a projection of the mean text state."""

    def __init__(self, rngs: nnx.Rngs):
        self.mix = nnx.Linear(2, 2, rngs=rngs)
        self.text = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, t, context):
        return self.mix(x) + self.text(jnp.mean(context, axis=1))[:, None, None, :]


def test_trainer_forwards_the_context_and_learns_from_it():
    """The step hands batch["context"] to the objective (the base Trainer forwards only x and labels): the text
    projection gets gradients, and a batch without context is refused with a clear error."""
    obj = TextDiffusionObjective(ddpm_loss(AC), DiscreteVPDenoiser(None, AC), jnp.zeros((5, 3)), 0.1)
    trainer, state = Trainer.create(TinyTextNet(nnx.Rngs(0)), obj, OptimizerConfig(1e-2, total_steps=10),
                                    sample_shape=(4, 4, 2))
    before = jax.tree.map(np.asarray, state.params["text"])
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((8, 4, 4, 2)).astype(np.float32),
             "context": rng.standard_normal((8, 5, 3)).astype(np.float32)}
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(np.asarray, state.params["text"])
    assert not np.allclose(before["kernel"].get_value(), after["kernel"].get_value())
    with pytest.raises(ValueError, match="context"):
        trainer.step(state, {"x": batch["x"]})
