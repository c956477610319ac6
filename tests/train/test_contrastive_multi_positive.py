"""Multi-positive contrastive targets (UniCL, Yang et al. 2022): a text is the pair of every image it describes."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from jaxdiff.train import OptimizerConfig
from jaxdiff.train.contrastive import (
    ContrastiveObjective,
    ContrastiveTrainer,
    clip_logits,
    contrastive_loss,
    described_positives,
    multi_positive_loss,
)


def numpy_multi_positive(logits: np.ndarray, positives: np.ndarray) -> float:
    """UniCL eq. 3-4 written loop by loop in float64: targets uniform over each row's / column's positives."""
    n = len(logits)
    text = [np.log(np.exp(logits[i]).sum()) - logits[i, positives[i]].mean() for i in range(n)]
    image = [np.log(np.exp(logits[:, j]).sum()) - logits[positives[:, j], j].mean() for j in range(n)]
    return (np.mean(text) + np.mean(image)) / 2


def test_two_by_two_closed_form():
    """Text 0 ("the digit seven") describes both images, text 1 only image 1."""
    a, b, c, d = 1.0, 0.5, -0.3, 2.0
    want = ((np.log(np.exp(a) + np.exp(b)) - (a + b) / 2 + np.log(np.exp(c) + np.exp(d)) - d) / 2
            + (np.log(np.exp(a) + np.exp(c)) - a + np.log(np.exp(b) + np.exp(d)) - (b + d) / 2) / 2) / 2
    got = multi_positive_loss(jnp.array([[a, b], [c, d]]), jnp.array([[True, True], [False, True]]))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_matches_loop_reference_and_reduces_to_the_clip_loss():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 7)) * 3
    positives = (rng.random((7, 7)) < 0.3) | np.eye(7, dtype=bool)
    got = multi_positive_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(positives))
    np.testing.assert_allclose(float(got), numpy_multi_positive(logits, positives), rtol=1e-5)
    eye = multi_positive_loss(jnp.asarray(logits, jnp.float32), jnp.eye(7, dtype=bool))
    np.testing.assert_allclose(float(eye), float(contrastive_loss(jnp.asarray(logits, jnp.float32))), rtol=1e-6)
    assert abs(float(got) - float(eye)) > 0.1
    with pytest.raises(ValueError, match="square"):
        multi_positive_loss(jnp.zeros((3, 3)), jnp.ones((3, 2), bool))


def test_identical_captions_alone_change_nothing():
    """Two rows with the same text have equal rows of logits, so counting them as each other's positives gives
    the plain loss back exactly: only texts that describe *other* images (digit-only captions) need targets."""
    rng = np.random.default_rng(1)
    text = rng.standard_normal((6, 5))
    text[4] = text[1]  # rows 1 and 4 carry one caption
    logits = clip_logits(jnp.asarray(text, jnp.float32), jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), 2.0)
    same = np.eye(6, dtype=bool)
    same[1, 4] = same[4, 1] = True
    np.testing.assert_allclose(float(multi_positive_loss(logits, jnp.asarray(same))), float(contrastive_loss(logits)),
                               rtol=1e-6)


def test_described_positives_reads_unnamed_attributes_as_anything():
    text = jnp.array([[7, -1, -1], [7, 2, 3], [1, 2, -1]])
    image = jnp.array([[7, 2, 3], [7, 5, 3], [1, 2, 0]])
    want = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(described_positives(text, image)), want)


def _model() -> CLIPModel:
    cfg = CLIPConfig(CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=6, eos_token_id=19),
                     CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=8, patch_size=4), projection_dim=8)
    return CLIPModel(cfg, rngs=nnx.Rngs(0))


def test_objective_uses_attribute_targets_when_the_batch_has_them():
    rng = np.random.default_rng(2)
    ids = np.full((4, 6), 19, np.int32)
    ids[:, :2] = rng.integers(0, 19, (4, 2))
    batch = {"x": jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32), "input_ids": jnp.asarray(ids)}
    attrs = {"text_attributes": jnp.array([[3, -1], [3, 1], [5, 0], [5, -1]]),
             "image_attributes": jnp.array([[3, 0], [3, 1], [5, 0], [5, 1]])}
    net = PureModel.of(_model())
    out = net(batch["input_ids"], batch["x"])
    logits = clip_logits(out.text_embeds, out.image_embeds, out.logit_scale)
    plain, _ = ContrastiveObjective()(net, batch, None)
    multi, _ = ContrastiveObjective()(net, {**batch, **attrs}, None)
    np.testing.assert_allclose(float(plain), float(contrastive_loss(logits)), rtol=1e-6)
    positives = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_allclose(float(multi), numpy_multi_positive(np.asarray(logits, np.float64), positives),
                               rtol=1e-5)
    trainer, state = ContrastiveTrainer.create(_model(), ContrastiveObjective(), OptimizerConfig(1e-3),
                                               sample_shape=(8, 8, 3), ema_decay=0.0)
    assert trainer.batch_keys({**batch, **attrs}) == ("x", "input_ids", "text_attributes", "image_attributes")
    with pytest.raises(ValueError, match="both"):
        trainer.check_batch({**batch, "text_attributes": attrs["text_attributes"]})
    with pytest.raises(ValueError, match=r"\(4, K\)"):
        trainer.check_batch({**batch, **attrs, "image_attributes": attrs["image_attributes"][:, :1]})
