"""Training a LoRA with the Trainer: only the factors train (the frozen U-Net stays bit-exact), the loss falls,
the trained adapter applies in the SD recipe and survives a save / load in both formats."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import lora
from jaxdiff.convert.lora_export import save_lora
from jaxdiff.convert.torch_layout import checkpoint_name
from jaxdiff.train import OptimizerConfig
from jaxdiff.train.lora import lora_trainer, trained_lora
from tests.pipelines import _tiny_sd


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _tiny_sd.build(tmp_path_factory.mktemp("tiny_lora_tok"))


def test_a_few_steps_lower_the_loss_and_change_only_the_lora(sd, tmp_path):
    rng = np.random.default_rng(0)
    # a concept the base does not draw: one fixed latent pattern for one prompt
    target = np.tile(rng.standard_normal((1, 4, 4, 4)).astype(np.float32), (8, 1, 1, 1))
    context = np.tile(np.asarray(sd.encode_prompt(["a b"])), (8, 1, 1))
    base = [np.array(x) for x in jax.tree_util.tree_leaves(sd.models.unet.state)]
    trainer, state = lora_trainer(sd, rank=2, sample_shape=(4, 4, 4), context_dropout=0.0,
                                  optimizer=OptimizerConfig(3e-2, warmup_steps=0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    targets = trainer.model(state)().names()
    assert all(checkpoint_name(n).split(".")[-2] in ("to_q", "to_k", "to_v", "0") for n in targets)
    shapes = [tuple(k.shape) for k in _kernels(sd, targets)]
    assert targets and all(len(s) == 2 for s in shapes)
    assert n_params == sum(2 * (a + b) for a, b in shapes)  # rank 2: down (in, 2) and up (2, out) only
    batch = {"x": target, "context": context}

    @jax.jit
    def held_out(params):  # the loss at 8 fixed noise draws
        net = trainer.model(dataclasses.replace(state, params=params), ema=False)
        return jnp.mean(jnp.stack([jnp.mean(trainer.objective(net, batch, jax.random.PRNGKey(100 + k))[0])
                                   for k in range(8)]))

    before = float(held_out(state.params))
    for _ in range(15):
        state, _ = trainer.step(state, batch)
    after = float(held_out(state.params))
    assert after < 0.7 * before, (before, after)
    for x, y in zip(base, jax.tree_util.tree_leaves(sd.models.unet.state)):
        np.testing.assert_array_equal(x, np.asarray(y))  # the base U-Net is untouched, bit for bit

    adapter = trained_lora(trainer, state, name="pattern")
    assert adapter.text_encoder is None and sorted(adapter.unet.names()) == sorted(targets)
    for fmt in ("diffusers", "kohya"):
        again = lora.load_lora(save_lora(tmp_path / f"{fmt}.safetensors", adapter, fmt), sd)
        for k, v in adapter.unet.deltas().items():
            np.testing.assert_allclose(np.asarray(again.unet.deltas()[k]), np.asarray(v), rtol=1e-6, atol=1e-8)
    sd_l, net = lora.apply(sd, [adapter], 1.0)
    kw = dict(steps=2, seed=[1], guidance=1.0, height=8, width=8, output="latent", mesh=None)
    assert np.abs(sd_l(["a b"], network_transform=net, **kw) - sd(["a b"], **kw)).max() > 1e-3


def _kernels(sd, names):
    from jaxdiff.models.patches import _params

    params = _params(sd.models.unet.state)
    return [params[n] for n in names]
