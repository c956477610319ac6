"""``fit``: the training loop (progress bar, JSONL metrics, periodic checkpoints, exact resume)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxdiff.train.checkpoint import CheckpointStore, run_identity
from jaxdiff.train.data import ArrayDataset
from jaxdiff.train.step import Trainer, TrainState


class MetricsLog:
    """Append-only JSON lines ``{"step", "loss", "lr", "steps_per_s", ...}``.

    Opening it at ``start_step`` drops lines with ``step > start_step``: those came from a run that
    was interrupted after its last checkpoint and will be recomputed identically.
    """

    def __init__(self, path: str | Path, start_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self._read_lines() if json.loads(line)["step"] <= start_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def _read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_dataset(trainer: Trainer, dataset: ArrayDataset) -> None:
    """Validate the data set's shapes and dtypes against the model before any compilation."""
    try:
        trainer.check_batch({k: a[:1] for k, a in dataset.arrays.items()})
        trainer.check_batch(dataset.batch(0))
    except ValueError as e:
        raise ValueError(f"the data set does not fit this model: {e}") from None


def fit(trainer: Trainer, state: TrainState, dataset: ArrayDataset, num_steps: int, *,
        workdir: str | Path | None = None, checkpoint_every: int | None = 1000, max_to_keep: int | None = 3,
        model_config: Any = None, log_every: int = 1, progress: bool = True, async_checkpoint: bool = True,
        callback: Callable[[int, TrainState, dict], None] | None = None) -> TrainState:
    """Train until ``state.step == num_steps``; with ``workdir``, resume from its latest checkpoint.

    ``workdir`` gets ``checkpoints/`` (every ``checkpoint_every`` steps and at the end) and
    ``metrics.jsonl``. Resuming checks that the checkpoint belongs to this model (``model_config``,
    parameter shapes) and data set, and continues with exactly the batches and noise an
    uninterrupted run would have used. ``callback(step, state, metrics)`` runs after each step
    (after that step's checkpoint was started).
    """
    check_dataset(trainer, dataset)
    store, log = None, None
    identity = run_identity(trainer.model_name, state.params, trainer.sample_shape, model_config)
    if workdir is not None:
        workdir = Path(workdir)
        store = CheckpointStore(workdir / "checkpoints", max_to_keep=max_to_keep, async_save=async_checkpoint)
        restored = store.restore(state, identity, dataset.identity())
        if restored is not None:
            state = trainer.place(restored[0])
        log = MetricsLog(workdir / "metrics.jsonl", int(state.step))
    start = int(state.step)
    saved = {start} if start > 0 else set()

    def save(step: int) -> None:
        if store is not None and step not in saved:
            store.save(step, state, identity, {"identity": dataset.identity(), "position": dataset.position(step)})
            saved.add(step)

    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, initial=start, disable=not progress, desc="training", unit="step")
    pending: list[tuple[int, dict]] = []
    clock = time.perf_counter()
    try:
        for i in range(start, num_steps):
            state, metrics = trainer.step(state, dataset.batch(i))
            pending.append((i + 1, metrics))
            due = store is not None and checkpoint_every and (i + 1) % checkpoint_every == 0
            if len(pending) >= log_every or due or i + 1 == num_steps:
                now = time.perf_counter()
                rate = len(pending) / max(now - clock, 1e-9)
                clock = now
                for step, m in jax.device_get(pending):
                    record = {"step": step, **{k: float(np.asarray(v)) for k, v in m.items()}, "steps_per_s": rate}
                    if log is not None:
                        log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                pending.clear()
            if due:
                save(i + 1)
            bar.update(1)
            if callback is not None:
                callback(i + 1, state, metrics)
        save(int(state.step))
    finally:
        bar.close()
        if store is not None:
            store.wait()
            store.close()
        if log is not None:
            log.close()
    return state


def fit_recorded(trainer: Trainer, state: TrainState, dataset: ArrayDataset, num_steps: int, *,
                 progress: bool = True, trace_every: int = 50) -> tuple[TrainState, dict[str, Any]]:
    """:func:`fit` from scratch (no workdir) and the run's record for a ``training.json``: steps, batch size, wall
    seconds, steps per second, epochs, and the loss every ``trace_every`` steps as ``[step, loss]`` pairs."""
    trace: list[list[float]] = []

    def keep(step: int, _: TrainState, metrics: dict) -> None:
        if step % trace_every == 0:
            trace.append([step, round(float(metrics["loss"]), 5)])

    start = time.perf_counter()
    state = fit(trainer, state, dataset, num_steps, progress=progress, callback=keep)
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    return state, {"steps": num_steps, "batch_size": dataset.batch_size, "seconds": round(seconds, 1),
                   "steps_per_s": round(num_steps / max(seconds, 1e-9), 2),
                   "epochs": round(num_steps * dataset.batch_size / dataset.num_examples, 2), "loss_trace": trace}
