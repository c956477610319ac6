"""Training a side network beside a frozen U-Net (ControlNet, Zhang et al. 2023 eq. 1; T2I-Adapter, Mou et al.
2023): closed-form expected losses on Gaussian data, the T2I-Adapter's cubic timestep law, and a real train step
of a zero-initialised ControlNet (which starts as the base model and leaves the base untouched)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.conditioning import Residuals
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.losses import CubicVPLevels, ddpm_loss
from jaxdiff.models._pure import PureModel
from jaxdiff.models.controlnet import controlnet_from_unet
from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jaxdiff.schedules import alphas_cumprod, vp_betas
from jaxdiff.train import OptimizerConfig, Trainer
from jaxdiff.train.control import ControlObjective
from jaxdiff.train.objectives import TextDiffusionObjective

AC = jnp.asarray(alphas_cumprod(vp_betas("scaled_linear", 1000, 0.00085, 0.012)), jnp.float32)


@pytree_dataclass
class OptimalBase:
    """E[eps | x_t] for x0 ~ N(0, I) (see test_text_objective), plus offsets the test can read off the loss: the
    context's mean and the mean of the residuals it is handed (a ControlNet's mid residual or an adapter's feature)."""

    ac: jax.Array

    def __call__(self, x, t, context, residuals=None):
        abar = jnp.interp(t, jnp.arange(self.ac.shape[0], dtype=jnp.float32), self.ac)
        r = residuals.mid if residuals.mid is not None else residuals.intra[0]
        offset = jnp.mean(context, axis=(1, 2)) + jnp.mean(r, axis=(1, 2, 3))
        return jnp.sqrt(1 - abar)[:, None] * x + offset[:, None]


def _controlnet_side(x, t, context, control):
    return Residuals(mid=control)


def _adapter_side(control):
    return (control,)


@pytest.mark.parametrize("side, net", [("controlnet", _controlnet_side), ("adapter", _adapter_side)])
def test_expected_loss_reads_the_control_and_drops_half_the_captions(side, net):
    """E loss = E_t[abar_t] + p (1 + c)^2 + (1 - p) c^2: a dropped caption's offset of 1 and a control image of
    constant value c (reaching the frozen base as residuals) add to the optimal predictor's error: the control
    reaches the base through the side network and captions are dropped with ControlNet's probability p = 0.5."""
    n, c = 16384, 0.5
    x0 = jax.random.normal(jax.random.PRNGKey(0), (n, 8))
    batch = {"x": x0, "context": jnp.zeros((n, 3, 2)), "control": jnp.full((n, 2, 2, 3), c)}
    objective = ControlObjective(ddpm_loss(AC), DiscreteVPDenoiser(None, AC, "epsilon"), OptimalBase(AC),
                                 jnp.ones((3, 2)), side=side)
    loss, _ = objective(net, batch, jax.random.PRNGKey(1))
    assert loss.shape == (n,)
    np.testing.assert_allclose(float(jnp.mean(loss)), float(jnp.mean(AC)) + 0.5 * (1 + c) ** 2 + 0.5 * c * c,
                               atol=0.03)


def test_cubic_timesteps_follow_the_t2i_adapter_law():
    """t = floor((1 - u^3) T): P(t < k) = 1 - (1 - k / T)^(1/3), most draws near the noisy end."""
    levels = CubicVPLevels(AC)
    t = np.asarray(levels.sample_t(jax.random.PRNGKey(0), 200_000))
    assert t.min() >= 0 and t.max() <= 999
    for k in (100, 500, 900):
        np.testing.assert_allclose(np.mean(t < k), 1 - (1 - k / 1000) ** (1 / 3), atol=0.005)
    sigmas = np.asarray(levels(jax.random.PRNGKey(0), 8))
    np.testing.assert_allclose(sigmas, np.asarray(levels.sigmas)[t[:8]], rtol=1e-6)


def test_objective_refuses_bad_settings():
    with pytest.raises(ValueError, match="side must be one of"):
        ControlObjective(ddpm_loss(AC), None, OptimalBase(AC), jnp.ones((3, 2)), side="lora")
    with pytest.raises(ValueError, match=r"context_dropout must be a probability in \[0, 1\)"):
        ControlObjective(ddpm_loss(AC), None, OptimalBase(AC), jnp.ones((3, 2)), 1.0)


def test_a_zero_initialised_controlnet_starts_as_the_base_model_and_trains_alone():
    """Step 0's loss equals the base U-Net's own loss on the same batch and key (the zero convolutions add
    nothing); the step changes the ControlNet's zero convolutions and leaves the base untouched."""
    cfg = UNet2DConditionConfig(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8,),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    base = PureModel.of(unet)
    cn = controlnet_from_unet(unet, rngs=nnx.Rngs(1), conditioning_embedding_out_channels=(4,))
    null = jnp.zeros((5, 8))
    template = DiscreteVPDenoiser(None, AC, "epsilon")
    objective = ControlObjective(ddpm_loss(AC), template, base, null)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((4, 4, 4, 4)).astype(np.float32),
             "context": rng.standard_normal((4, 5, 8)).astype(np.float32),
             "control": rng.uniform(0, 1, (4, 4, 4, 3)).astype(np.float32)}
    trainer, state = Trainer.create(cn, objective, OptimizerConfig(1e-2), sample_shape=(4, 4, 4), ema_decay=0.0)
    key = jax.random.fold_in(state.key, 0)
    controlled, _ = objective(trainer.model(state, ema=False), {k: jnp.asarray(v) for k, v in batch.items()}, key)
    plain, _ = TextDiffusionObjective(ddpm_loss(AC), template, null, 0.5)(
        base, {k: jnp.asarray(batch[k]) for k in ("x", "context")}, key)
    np.testing.assert_allclose(np.asarray(controlled), np.asarray(plain), rtol=1e-5)
    before = jax.tree.map(np.array, nnx.state(unet))
    zero_mid = np.asarray(state.params["controlnet_mid_block"]["kernel"].get_value())
    assert not zero_mid.any()
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert np.asarray(state.params["controlnet_mid_block"]["kernel"].get_value()).any()
    after = jax.tree.map(np.array, nnx.state(unet))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
