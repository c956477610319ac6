"""The train state and the jit-compiled train step (optax, EMA, mixed precision, data parallel).

The NNX model is split once into ``(graphdef, params, buffers)``; everything after that is pure
pytrees. A step's randomness is ``fold_in(state.key, state.step)``, so noise, noise levels and label
dropout are a deterministic function of (seed, step), which makes resumed runs exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.parallel import auto_mesh
from jaxdiff.models._pure import PureModel
from jaxdiff.train.ema import ema_decay_at, ema_update
from jaxdiff.train.optim import OptimizerConfig, make_optimizer

Array = jax.Array


@pytree_dataclass
class TrainState:
    """Everything a step changes, all arrays: checkpointing this is checkpointing the run."""

    step: Array  # int32: updates done so far
    params: Any  # nnx.State of float32 parameters
    ema: Any  # same structure as params
    opt_state: Any
    key: Array  # raw uint32 PRNG key; step keys are fold_in(key, step)
    ema_decay: Array  # float32 leaf: changing it never recompiles
    buffers: Any  # non-trainable model state (kept constant)


@pytree_dataclass
class _Cast:
    """Mixed precision: the network sees ``x`` in ``dtype`` and returns float32 (other inputs untouched)."""

    net: Any
    dtype: Any = static_field()

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Array:
        return self.net(x.astype(self.dtype), *args, **kwargs).astype(jnp.float32)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def network(graphdef: Any, params: Any, buffers: Any, compute_dtype: Any = None) -> Callable[..., Array]:
    """The pure network for these parameters; with ``compute_dtype`` the weights and x are cast to it."""
    if compute_dtype is None:
        return PureModel(state=nnx.merge_state(params, buffers), graphdef=graphdef)
    dt = jnp.dtype(compute_dtype)
    model = PureModel(state=nnx.merge_state(_cast_floats(params, dt), buffers), graphdef=graphdef)
    return _Cast(model, dt)


def _train_step(state: TrainState, batch: dict, objective: Any, *, graphdef: Any, tx: optax.GradientTransformation,
                schedule: optax.Schedule, compute_dtype: Any, ema_warmup: bool) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.key, state.step)

    def loss_fn(params: Any) -> tuple[Array, dict]:
        per_sample, aux = objective(network(graphdef, params, state.buffers, compute_dtype), batch, key)
        return jnp.mean(per_sample), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, ema_decay_at(state.ema_decay, state.step, ema_warmup))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}
    new = dataclasses.replace(state, step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
    return new, metrics


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """Holds the static parts of a run (graph, objective, optimiser, shapes) and its compiled step.

    Build with :meth:`create`. ``mesh`` (optional) makes the step data parallel: the batch is split
    on ``data_axis``, the state is replicated.
    """

    graphdef: Any
    objective: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    sample_shape: tuple[int, ...]
    model_name: str
    compute_dtype: Any = None
    ema_warmup: bool = False
    mesh: Mesh | None = None
    data_axis: str = "data"
    step_fn: Callable[..., Any] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mesh is not None:
            object.__setattr__(self, "mesh", auto_mesh(self.mesh))  # only in/out shardings fixed; XLA places the rest
        step = lambda s, b, o: _train_step(s, b, o, graphdef=self.graphdef, tx=self.tx,  # noqa: E731
                                           schedule=self.schedule, compute_dtype=self.compute_dtype,
                                           ema_warmup=self.ema_warmup)
        donate = () if jax.default_backend() == "cpu" else (0,)  # CPU cannot reuse donated buffers
        if self.mesh is None:
            jitted = jax.jit(step, donate_argnums=donate)
        else:
            if self.data_axis not in self.mesh.axis_names:
                raise ValueError(f"the mesh has axes {self.mesh.axis_names}, none named {self.data_axis!r}; "
                                 f"build it with jax.make_mesh((n,), ({self.data_axis!r},))")
            rep = self.replicated
            jitted = jax.jit(step, in_shardings=(rep, self.batch_sharding, rep), out_shardings=(rep, rep),
                             donate_argnums=donate)
        object.__setattr__(self, "step_fn", jitted)

    @classmethod
    def create(cls, model: nnx.Module, objective: Any, optimizer: OptimizerConfig, *, sample_shape: tuple[int, ...],
               seed: int = 0, ema_decay: float = 0.999, ema_warmup: bool = False, compute_dtype: Any = None,
               mesh: Mesh | None = None, data_axis: str = "data") -> tuple["Trainer", TrainState]:
        """Split ``model`` once and return the trainer and its initial state (params kept float32)."""
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        bad = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
               if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != jnp.float32]
        if bad:
            raise ValueError(f"parameters must be stored in float32 (got other dtypes at {bad[:3]}); build the "
                             "model with param_dtype=jnp.float32 and use compute_dtype= for bfloat16 compute")
        tx, schedule = make_optimizer(optimizer)
        trainer = cls(graphdef, objective, tx, schedule, tuple(int(d) for d in sample_shape), type(model).__name__,
                      compute_dtype, ema_warmup, mesh, data_axis)
        state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params), key=jax.random.PRNGKey(seed), ema_decay=jnp.asarray(ema_decay, jnp.float32),
            buffers=buffers)
        return trainer, trainer.place(state)

    # ---- shardings ------------------------------------------------------------------------
    @property
    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec(self.data_axis))

    def place(self, state: TrainState) -> TrainState:
        """Put a state on the trainer's devices (replicated over the mesh)."""
        return state if self.mesh is None else jax.device_put(state, self.replicated)

    # ---- batches --------------------------------------------------------------------------
    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise a clear ValueError if a batch does not fit the model and objective."""
        if not isinstance(batch, Mapping) or "x" not in batch:
            raise ValueError(f"a batch must be a dict with key 'x' (and 'label' for labels), got {type(batch).__name__}"
                             + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
        x = batch["x"]
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"data samples have shape {tuple(x.shape[1:])}, but the model was set up for "
                             f"{self.sample_shape} (images are NHWC: (batch, height, width, channels))")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"data 'x' has dtype {x.dtype}; convert it to float32 (e.g. scaled to [-1, 1])")
        if getattr(self.objective, "needs_labels", False):
            if "label" not in batch:
                raise ValueError(f"the {type(self.objective).__name__} needs integer labels: add batch['label']")
            y = batch["label"]
            if not jnp.issubdtype(y.dtype, jnp.integer) or tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"batch['label'] must be integers of shape ({x.shape[0]},), "
                                 f"got {y.dtype} {tuple(y.shape)}")
        missing = [k for k in getattr(self.objective, "batch_keys", ()) if k not in batch]
        if missing:
            raise ValueError(f"the {type(self.objective).__name__} reads batch entries {missing}; add them to the batch")
        if self.mesh is not None and x.shape[0] % self.mesh.shape[self.data_axis]:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {self.mesh.shape[self.data_axis]} "
                             f"devices on mesh axis {self.data_axis!r}")

    def batch_keys(self, batch: Mapping[str, Any]) -> tuple[str, ...]:
        """The entries of a (checked) batch that :meth:`step` hands the objective."""
        keys = getattr(self.objective, "batch_keys", None)  # an objective may name the entries it reads
        if keys is not None:
            return tuple(keys)
        return ("x", "label") if getattr(self.objective, "needs_labels", False) else ("x",)

    def step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        """One optimiser update (the input state is donated: do not reuse it)."""
        self.check_batch(batch)
        batch = {k: jnp.asarray(batch[k]) if self.mesh is None else jax.device_put(np.asarray(batch[k]),
                                                                                   self.batch_sharding)
                 for k in self.batch_keys(batch)}
        return self.step_fn(state, batch, self.objective)

    # ---- using the result -----------------------------------------------------------------
    def model(self, state: TrainState, ema: bool = True) -> PureModel:
        """The trained network as a pure callable (EMA weights by default)."""
        return network(self.graphdef, state.ema if ema else state.params, state.buffers)

    def denoiser(self, state: TrainState, ema: bool = True) -> Any:
        """The sampler's denoiser: the objective's adapter around the trained network."""
        return self.objective.denoiser_for(self.model(state, ema))
