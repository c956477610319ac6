"""The train step: optimiser recipe, EMA, label dropout, mixed precision, bad input, learning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdiff import losses as L
from jaxdiff.denoisers import EDMClassifier, EDMDenoiser, VEDenoiser
from jaxdiff.mixtures import MixtureClassifier, make_mixture
from jaxdiff.train import (ArrayDataset, ClassifierObjective, DiffusionObjective, OptimizerConfig, Trainer,
                           drop_labels, fit, fit_recorded, learning_rate_schedule, make_optimizer)
from train_nets import TinyClassifierNet, TinyDenoiserNet, gaussian_data

EDM = DiffusionObjective(L.edm_loss(), EDMDenoiser(None))


def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def edm_run():
    """A trained-for-300-steps EDM model on Gaussian data, with its initial state copy."""
    cfg = OptimizerConfig(3e-3, warmup_steps=20, total_steps=300, clip_norm=1.0)
    trainer, state = Trainer.create(TinyDenoiserNet(4, rngs=nnx.Rngs(0)), EDM, cfg, sample_shape=(4,),
                                    ema_decay=0.9)
    init = jax.tree.map(jnp.copy, state)
    data = ArrayDataset(gaussian_data(1024), batch_size=128, seed=1)
    final = fit(trainer, state, data, 300, progress=False)
    return trainer, init, final, data


def test_learning_rate_schedule_closed_form():
    cos = learning_rate_schedule(OptimizerConfig(2.0, warmup_steps=10, total_steps=110, final_lr_fraction=0.1))
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(1.0) and float(cos(10)) == pytest.approx(2.0)
    # half-way through the cosine: peak * (alpha + (1 - alpha) / 2)
    assert float(cos(60)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(cos(110)) == pytest.approx(0.2, rel=1e-5)
    const = learning_rate_schedule(OptimizerConfig(2.0, warmup_steps=4, schedule="constant"))
    assert [float(const(s)) for s in (0, 2, 4, 1000)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="linear")


def test_gradient_clipping_reaches_adam_moments():
    tx, _ = make_optimizer(OptimizerConfig(1e-3, clip_norm=0.5, b1=0.9, weight_decay=0.01))
    params = {"w": jnp.ones((3,)), "b": jnp.ones((2,))}
    grads = {"w": jnp.full((3,), 4.0), "b": jnp.full((2,), -3.0)}  # global norm sqrt(66)
    _, opt_state = jax.jit(tx.update)(grads, tx.init(params), params)
    mu = opt_state[1][0].mu  # (clip state, (adam state, ...))
    assert float(optax.tree.norm(mu)) == pytest.approx(0.1 * 0.5, rel=1e-5)
    np.testing.assert_allclose(mu["w"] / mu["b"][0], -4.0 / 3.0, rtol=1e-6)


def test_ema_warmup_decay():
    from jaxdiff.train.ema import ema_decay_at
    assert float(ema_decay_at(jnp.float32(0.999), 0, True)) == pytest.approx(0.1)
    assert float(ema_decay_at(jnp.float32(0.999), 90, True)) == pytest.approx(0.91)
    assert float(ema_decay_at(jnp.float32(0.999), 10**6, True)) == pytest.approx(0.999)
    assert float(ema_decay_at(jnp.float32(0.999), 0, False)) == pytest.approx(0.999)


def test_step_updates_ema_and_counts(edm_run):
    trainer, init, _, data = edm_run
    state = jax.tree.map(jnp.copy, init)
    p0 = leaves(state.params)
    new, metrics = trainer.step(state, data.batch(0))
    assert int(new.step) == 1 and float(metrics["lr"]) == 0.0  # warm-up starts at 0
    for e, a, b in zip(leaves(new.ema), p0, leaves(new.params)):
        np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7)
    new2, metrics2 = trainer.step(new, data.batch(1))
    assert float(metrics2["lr"]) == pytest.approx(3e-3 / 20)
    assert not np.allclose(leaves(new2.params)[0], leaves(new.params)[0])


def test_training_approaches_the_analytic_minimum(edm_run):
    """EDM loss of the trained model's EMA on fresh data is near that of the exact Gaussian denoiser."""
    trainer, init, final, _ = edm_run
    fresh = jnp.asarray(gaussian_data(4096, seed=9)["x"])
    key = jax.random.key(4)
    loss = jax.jit(lambda d: jnp.mean(L.edm_loss()(d, fresh, key)))

    def exact(x, sigma, cond=None):  # gaussian_data without classes: x0 ~ N(-0.3, 0.25^2 I)
        mu = -0.3
        v = 0.25**2
        s2 = (sigma * sigma)[:, None]
        return mu + v / (v + s2) * (x - mu)

    before = float(loss(trainer.objective.denoiser_for(trainer.model(init, ema=False))))
    after = float(loss(trainer.denoiser(final)))
    best = float(loss(jax.tree_util.Partial(exact)))
    assert after < before - 0.5 * (before - best), (before, after, best)
    assert after < 1.3 * best, (after, best)


def test_label_dropout_rate_and_no_recompile():
    labels = jnp.arange(100_000) % 7
    dropped = drop_labels(labels, jax.random.key(0), 0.2, 7)
    assert abs(float(jnp.mean(dropped == 7)) - 0.2) < 0.01
    assert bool(jnp.all((dropped == labels) | (dropped == 7)))
    # through the objective: a net that outputs 1 exactly when it sees the null label
    net = lambda x, c, cond: jnp.broadcast_to((cond == 3)[:, None], x.shape).astype(x.dtype)  # noqa: E731
    obj = DiffusionObjective(L.x0_loss(L.LogNormalLevels()), VEDenoiser(None, "sample"), 0.3, True, 3)
    batch = {"x": jnp.zeros((20_000, 2)), "label": jnp.zeros((20_000,), jnp.int32)}
    per_sample, _ = jax.jit(obj)(jax.tree_util.Partial(net), batch, jax.random.key(1))
    assert set(np.unique(np.asarray(per_sample))) <= {0.0, 1.0}
    assert abs(float(per_sample.mean()) - 0.3) < 0.015
    with pytest.raises(ValueError, match="null_label"):
        DiffusionObjective(L.edm_loss(), EDMDenoiser(None), 0.1, True)


def test_runtime_values_do_not_recompile():
    obj = DiffusionObjective(L.edm_loss(), EDMDenoiser(None), 0.1, True, 2)
    trainer, state = Trainer.create(TinyDenoiserNet(4, num_classes=2, rngs=nnx.Rngs(0)), obj,
                                    OptimizerConfig(1e-3), sample_shape=(4,))
    data = gaussian_data(64, num_classes=2)
    state, _ = trainer.step(state, data)
    other = dataclasses.replace(trainer, objective=dataclasses.replace(obj, label_dropout=0.5))
    object.__setattr__(other, "step_fn", trainer.step_fn)
    state = dataclasses.replace(state, ema_decay=jnp.asarray(0.5, jnp.float32))
    state, _ = other.step(state, data)
    assert trainer.step_fn._cache_size() == 1


def test_bfloat16_compute_keeps_float32_params(edm_run):
    f32_trainer, init, _, _ = edm_run  # same network, seed and objective in float32
    data = gaussian_data(64)
    _, m32 = f32_trainer.step(jax.tree.map(jnp.copy, init), data)
    trainer, state = Trainer.create(TinyDenoiserNet(4, rngs=nnx.Rngs(0)), EDM, OptimizerConfig(1e-3),
                                    sample_shape=(4,), compute_dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(trainer.step_fn)(state, {"x": jnp.asarray(data["x"])}, EDM))
    assert "bf16" in jaxpr and "bf16" not in str(jax.make_jaxpr(f32_trainer.step_fn)(init, {"x": data["x"]}, EDM))
    new, m16 = trainer.step(state, data)
    assert all(a.dtype == np.float32 for a in leaves(new.params) + leaves(new.ema))
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=3e-2)
    assert float(m16["loss"]) != float(m32["loss"])


def test_bad_input_raises_clear_errors():
    trainer, state = Trainer.create(TinyDenoiserNet(4, rngs=nnx.Rngs(0)), EDM, OptimizerConfig(1e-3),
                                    sample_shape=(4,))
    with pytest.raises(ValueError, match=r"shape \(5,\).*\(4,\)"):
        fit(trainer, state, ArrayDataset({"x": np.zeros((32, 5), np.float32)}, 8), 1, progress=False)
    with pytest.raises(ValueError, match="dtype uint8; convert it to float32"):
        fit(trainer, state, ArrayDataset({"x": np.zeros((32, 4), np.uint8)}, 8), 1, progress=False)
    with pytest.raises(ValueError, match="same leading"):
        ArrayDataset({"x": np.zeros((32, 4)), "label": np.zeros(31)}, 8)
    cls = ClassifierObjective(L.NoisyClassifierLoss(L.LogNormalLevels()), EDMClassifier(None))
    trainer, state = Trainer.create(TinyClassifierNet(4, 2, rngs=nnx.Rngs(0)), cls, OptimizerConfig(1e-3),
                                    sample_shape=(4,))
    with pytest.raises(ValueError, match="needs integer labels"):
        trainer.step(state, {"x": np.zeros((8, 4), np.float32)})
    with pytest.raises(ValueError, match="integers of shape"):
        trainer.step(state, {"x": np.zeros((8, 4), np.float32), "label": np.zeros(8, np.float32)})
    with pytest.raises(TypeError, match="`net` field"):
        ClassifierObjective(L.NoisyClassifierLoss(L.LogNormalLevels()), object())


def test_noisy_classifier_training_approaches_the_exact_posterior():
    levels = L.LogNormalLevels(-1.0, 1.0)
    obj = ClassifierObjective(L.NoisyClassifierLoss(levels), EDMClassifier(None, 0.4))
    trainer, state = Trainer.create(TinyClassifierNet(4, 2, rngs=nnx.Rngs(0)), obj,
                                    OptimizerConfig(1e-2, warmup_steps=10, total_steps=300), sample_shape=(4,),
                                    ema_decay=0.95)
    state = fit(trainer, state, ArrayDataset(gaussian_data(2048, num_classes=2), 128), 300, progress=False)
    mixture = make_mixture([[-0.3] * 4, [0.3] * 4], 0.25, [1.0, 1.0], [0, 1])
    test = gaussian_data(4096, seed=5, num_classes=2)
    x0, y = jnp.asarray(test["x"]), jnp.asarray(test["label"])
    ce = jax.jit(lambda c: jnp.mean(L.NoisyClassifierLoss(levels)(c, x0, jax.random.key(3), y)))
    exact, trained = float(ce(MixtureClassifier(mixture))), float(ce(obj.classifier_for(trainer.model(state))))
    assert exact < trained < exact + 0.03 and trained < 0.5 * np.log(2), (exact, trained)


def test_fit_recorded_traces_the_loss_and_matches_fit():
    """The recorded run is fit's run (same parameters), with the loss every trace_every steps and the epochs."""
    def start():
        return Trainer.create(TinyDenoiserNet(4, rngs=nnx.Rngs(0)), EDM, OptimizerConfig(1e-3), sample_shape=(4,))

    data = ArrayDataset(gaussian_data(96), batch_size=32, seed=1)
    trainer, state = start()
    plain = fit(trainer, state, data, 7, progress=False)
    trainer, state = start()
    recorded, record = fit_recorded(trainer, state, data, 7, progress=False, trace_every=3)
    for a, b in zip(leaves(plain.params), leaves(recorded.params)):
        np.testing.assert_array_equal(a, b)
    assert [step for step, _ in record["loss_trace"]] == [3, 6]
    assert all(np.isfinite(loss) for _, loss in record["loss_trace"])
    assert (record["steps"], record["batch_size"], record["epochs"]) == (7, 32, round(7 * 32 / 96, 2))
