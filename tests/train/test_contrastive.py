"""CLIP's contrastive loss (Radford et al. 2021, Fig. 3) and its train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from jaxdiff.train import ArrayDataset, OptimizerConfig, fit
from jaxdiff.train.contrastive import (
    ContrastiveObjective,
    ContrastiveTrainer,
    clip_logits,
    clip_loss,
    contrastive_loss,
    matching_accuracy,
)


def numpy_clip_loss(text: np.ndarray, image: np.ndarray, logit_scale: float) -> float:
    """Fig. 3 of the paper, in float64 numpy, written out loop by loop."""
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    i = image / np.linalg.norm(image, axis=1, keepdims=True)
    logits = np.dot(t, i.T) * min(np.exp(logit_scale), 100.0)
    n = len(logits)

    def ce(rows: np.ndarray) -> float:
        return float(np.mean([np.log(np.sum(np.exp(rows[k]))) - rows[k, k] for k in range(n)]))

    return (ce(logits) + ce(logits.T)) / 2


@pytest.mark.parametrize("logit_scale", [0.0, 2.6592, 5.0])  # 5.0: exp = 148 is clipped to 100
def test_loss_matches_numpy_reference(logit_scale):
    rng = np.random.default_rng(0)
    text, image = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    got = clip_loss(jnp.asarray(text, jnp.float32), jnp.asarray(image, jnp.float32), jnp.float32(logit_scale))
    np.testing.assert_allclose(float(got), numpy_clip_loss(text, image, logit_scale), rtol=1e-5)


def test_clipped_scale_has_no_gradient_and_perfect_pairs_give_low_loss():
    rng = np.random.default_rng(1)
    text = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    image = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    grad = jax.grad(clip_loss, argnums=2)
    assert float(grad(text, image, jnp.float32(5.0))) == 0.0  # above log(100): clipped
    assert float(grad(text, image, jnp.float32(1.0))) != 0.0
    eye = jnp.eye(4, 8)
    assert float(clip_loss(eye, eye, jnp.log(100.0))) < 1e-6  # orthogonal matching pairs at scale 100
    assert float(clip_loss(eye, eye[::-1], jnp.log(100.0))) > 50  # every pair wrong
    assert [float(a) for a in matching_accuracy(clip_logits(eye, eye[jnp.array([1, 0, 2, 3])], 0.0))] == [0.5, 0.5]
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(jnp.zeros((3, 4)))


def _tiny_config(vocab: int = 40, image: int = 8) -> CLIPConfig:
    return CLIPConfig(
        CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=8, eos_token_id=vocab - 1),
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         image_size=image, patch_size=4),
        projection_dim=16)


@pytest.mark.parity
def test_loss_matches_transformers_clip_model_loss(tmp_path):
    """Same weights (exported from jaxdiff), same pairs: jaxdiff's loss equals ``CLIPModel(return_loss=True)``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxdiff.convert.export import save_pretrained

    model = CLIPModel(_tiny_config(), rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path)
    ref = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 39, (5, 8))
    ids[:, -1] = 39
    pixels = rng.standard_normal((5, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                   return_loss=True).loss.item()
    batch = {"x": jnp.asarray(pixels), "input_ids": jnp.asarray(ids)}

    @jax.jit
    def losses(net, batch):
        out = net(batch["input_ids"], batch["x"])
        return clip_loss(out.text_embeds, out.image_embeds, out.logit_scale), ContrastiveObjective()(net, batch, None)

    got, (loss, aux) = losses(PureModel.of(model), batch)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["logit_scale"]), np.exp(2.6592), rtol=1e-6)


def _pairs(n: int = 16, vocab: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random images paired with ``n`` distinct token sequences (BOS-less, EOS then EOS padding)."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, 8), vocab - 1, np.int32)
    ids[:, :3] = rng.choice(np.arange(vocab - 1), size=(n, 3), replace=True)
    ids[:, 0] = np.arange(n)  # distinct first tokens: every sequence differs
    return {"x": rng.standard_normal((n, 8, 8, 3)).astype(np.float32), "input_ids": ids}


def test_train_step_learns_to_match_sixteen_pairs():
    """From chance (1/16) to every image finding its caption and every caption its image, through ``fit``."""
    data = _pairs()
    model = CLIPModel(_tiny_config(), rngs=nnx.Rngs(0))
    trainer, state = ContrastiveTrainer.create(
        model, ContrastiveObjective(), OptimizerConfig(3e-3, schedule="constant", clip_norm=1.0),
        sample_shape=(8, 8, 3), ema_decay=0.0)
    start = trainer.model(state, ema=False)(jnp.asarray(data["input_ids"]), jnp.asarray(data["x"])).logits_per_text
    losses = []
    state = fit(trainer, state, ArrayDataset(data, batch_size=16), 30, progress=False,
                callback=lambda step, st, metrics: losses.append(float(metrics["loss"])))
    assert int(state.step) == 30 and len(losses) == 30
    assert max(float(a) for a in matching_accuracy(start)) < 0.5 and losses[0] > 2.0  # near chance at the start
    logits = trainer.model(state, ema=False)(jnp.asarray(data["input_ids"]), jnp.asarray(data["x"])).logits_per_text
    t2i, i2t = matching_accuracy(logits)
    assert float(t2i) == 1.0 and float(i2t) == 1.0, (losses[-1], float(t2i), float(i2t))
    assert losses[-1] < 0.1 * losses[0]

    with pytest.raises(ValueError, match="input_ids"):
        trainer.step(state, {"x": data["x"]})
    with pytest.raises(ValueError, match="integers of shape"):
        trainer.step(state, {"x": data["x"], "input_ids": data["input_ids"][:3]})
    with pytest.raises(TypeError, match="not a denoiser"):
        trainer.denoiser(state)
