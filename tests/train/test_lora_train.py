"""Training a LoRA with the Trainer: only the factors train (the frozen U-Net stays bit-exact), the loss falls,
and the trained adapter survives a save / load in both formats (the SD recipe runs adapters in
tests/pipelines/test_lora_parity.py)."""
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


STEPS = 12
TARGETS = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.2|conv_in|conv_out)$"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _tiny_sd.build(tmp_path_factory.mktemp("tiny_lora_tok"))


def test_a_few_steps_lower_the_loss_and_change_only_the_lora(sd, tmp_path):
    rng = np.random.default_rng(0)
    # a concept the base does not draw: one fixed latent pattern for one prompt
    target = np.tile(rng.standard_normal((1, 4, 4, 4)).astype(np.float32), (8, 1, 1, 1))
    context = np.tile(np.asarray(sd.encode_prompt(["a b"])), (8, 1, 1))
    base = [np.array(x) for x in jax.tree_util.tree_leaves(sd.models.unet.state)]
    trainer, state = lora_trainer(sd, rank=2, sample_shape=(4, 4, 4), context_dropout=0.0, targets=TARGETS,
                                  optimizer=OptimizerConfig(1e-1, schedule="constant"))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    targets = trainer.model(state)().names()
    assert {checkpoint_name(n).split(".")[-2] for n in targets} >= {"to_q", "to_k", "to_v", "0", "conv_in", "proj_in"}
    shapes = [tuple(k.shape) for k in _kernels(sd, targets)]
    assert any(len(s) == 4 for s in shapes) and any(len(s) == 2 for s in shapes)  # Linear and conv (LoRA-conv)
    assert n_params == sum(2 * (np.prod(s[:-1]) + s[-1]) for s in shapes)  # rank 2: down (.., in, 2), up (2, out)
    batch = {"x": target, "context": context}

    def held_out(st):  # the loss at 8 fixed draws: the step's metrics at fixed step numbers (same program)
        fixed = [dataclasses.replace(jax.tree.map(jnp.copy, st), step=jnp.int32(10_000 + k)) for k in range(8)]
        return np.mean([float(trainer.step(f, batch)[1]["loss"]) for f in fixed])  # (copies: steps donate)

    before = held_out(state)
    for _ in range(STEPS):
        state, _ = trainer.step(state, batch)
    after = held_out(state)
    assert after < 0.85 * before, (before, after)
    for x, y in zip(base, jax.tree_util.tree_leaves(sd.models.unet.state)):
        np.testing.assert_array_equal(x, np.asarray(y))  # the base U-Net is untouched, bit for bit

    adapter = trained_lora(trainer, state, name="pattern")
    assert adapter.text_encoder is None and sorted(adapter.unet.names()) == sorted(targets)
    for fmt in ("diffusers", "kohya"):
        again = lora.load_lora(save_lora(tmp_path / f"{fmt}.safetensors", adapter, fmt), sd)
        for k, v in adapter.unet.deltas().items():
            np.testing.assert_allclose(np.asarray(again.unet.deltas()[k]), np.asarray(v), rtol=1e-6, atol=1e-8)


def _kernels(sd, names):
    from jaxdiff.models.patches import _params

    params = _params(sd.models.unet.state)
    return [params[n] for n in names]
