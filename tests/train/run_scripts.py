"""Runs the training tests start as subprocesses (a killed run, an 8-device run).

``python run_scripts.py resume WORKDIR NUM_STEPS KILL_AT``: trains and dies with ``os._exit(3)``
right after step KILL_AT. ``python run_scripts.py parallel``: prints JSON losses of data-parallel and
single-device runs (set XLA_FLAGS=--xla_force_host_platform_device_count=8 first).
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import losses as L
from jaxdiff.denoisers import EDMDenoiser
from jaxdiff.train import ArrayDataset, DiffusionObjective, OptimizerConfig, Trainer, fit
from train_nets import TinyDenoiserNet, gaussian_data

NUM_CLASSES = 3


def build(hidden: int = 32, mesh=None):
    """A conditional EDM run with label dropout (so labels, noise and dropout all must resume exactly)."""
    obj = DiffusionObjective(L.edm_loss(), EDMDenoiser(None), 0.2, True, NUM_CLASSES)
    model = TinyDenoiserNet(4, hidden, NUM_CLASSES, rngs=nnx.Rngs(0))
    return Trainer.create(model, obj, OptimizerConfig(3e-3, warmup_steps=2, total_steps=8), sample_shape=(4,),
                          seed=5, mesh=mesh)


def dataset(batch_size: int = 16) -> ArrayDataset:
    return ArrayDataset(gaussian_data(40, num_classes=NUM_CLASSES), batch_size, seed=2)  # 2 batches per epoch


def run(trainer, state, workdir, num_steps, kill_at=None, hidden=32, checkpoint_every=4):
    def die(step, state, metrics):
        if step == kill_at:
            os._exit(3)
    return fit(trainer, state, dataset(), num_steps, workdir=workdir, checkpoint_every=checkpoint_every,
               max_to_keep=1, model_config={"hidden": hidden}, progress=False, async_checkpoint=False,
               callback=die)


def parallel() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",))
    out = {}
    for name, m in (("mesh", mesh), ("single", None)):
        trainer, state = build(mesh=m)
        losses = []
        for i in range(4):
            state, metrics = trainer.step(state, dataset(32).batch(i))
            losses.append(float(metrics["loss"]))
        out[name] = losses
        leaf = jax.tree.leaves(state.params)[0]
        out[name + "_replicated"] = bool(leaf.sharding.is_fully_replicated)
        out[name + "_devices"] = len(leaf.sharding.device_set)
    trainer, _ = build(mesh=mesh)
    sharded = jax.device_put(np.zeros((32, 4), np.float32), trainer.batch_sharding)
    out["batch_shard_rows"] = sorted({s.data.shape[0] for s in sharded.addressable_shards})
    try:
        trainer.check_batch({"x": np.zeros((12, 4), np.float32), "label": np.zeros(12, np.int32)})
    except ValueError as e:
        out["indivisible_error"] = str(e)
    # the pure losses also run under jax.pmap (one shard of the batch per device)
    loss = L.edm_loss()
    denoiser = EDMDenoiser(jax.tree_util.Partial(lambda x, c, cond: jnp.tanh(x) * c[:, None]))
    x0 = jnp.asarray(dataset(32).batch(0)["x"])
    keys = jax.random.split(jax.random.key(0), 8)
    pmapped = jax.pmap(lambda x, k: loss(denoiser, x, k))(x0.reshape(8, 4, 4), keys)
    single = jnp.stack([loss(denoiser, x0.reshape(8, 4, 4)[i], keys[i]) for i in range(8)])
    out["pmap_max_diff"] = float(jnp.max(jnp.abs(pmapped - single)))
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        trainer, state = build()
        run(trainer, state, sys.argv[2], int(sys.argv[3]), kill_at=int(sys.argv[4]))
    elif sys.argv[1] == "parallel":
        parallel()
