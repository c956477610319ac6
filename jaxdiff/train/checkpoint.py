"""Checkpoints of a whole run with orbax: the train state plus a small JSON record.

Each step directory (``<dir>/<step>/``) holds two orbax items: ``state`` (params, EMA, optimiser
state, step, RNG key, EMA decay, buffers; ``StandardSave``) and ``meta`` (``JsonSave``): the run's
identity (model class, config, parameter shapes, sample shape), the data-set identity and iterator
position, and a SHA-256 of every state array. Orbax writes each step atomically (temporary directory,
then rename) and keeps the newest ``max_to_keep``.

Reading never writes: restores go through a read-only manager, and a writable one is only opened at
the first save, so a mismatched or corrupted directory raises before anything in it is touched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "jaxdiff.train/1"
ITEMS = ("state", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back faithfully (missing, truncated, garbled)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint directory that belongs to a different model or data set."""


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def tree_checksum(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (host copies)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_identity(model_name: str, params: Any, sample_shape: tuple[int, ...], config: Any = None) -> dict:
    """What must match for a checkpoint to belong to this model."""
    shapes = {jax.tree_util.keystr(p): [list(a.shape), str(a.dtype)]
              for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    return _jsonable({"model": model_name, "config": config or {}, "sample_shape": list(sample_shape),
                      "params": shapes})


def _short(e: Exception, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            if k not in saved:
                out.append(f"{prefix}{k}: missing in the checkpoint")
            elif k not in current:
                out.append(f"{prefix}{k}: only in the checkpoint")
            else:
                out += _differences(saved[k], current[k], f"{prefix}{k}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, this run has {current!r}"]


class CheckpointStore:
    """Save and restore :class:`~jaxdiff.train.step.TrainState` checkpoints in ``directory``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._writer: ocp.CheckpointManager | None = None

    def _reader(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """Finished checkpoint steps (orbax ignores unfinished temporary ones)."""
        if self._writer is not None:
            return list(self._writer.all_steps())
        if not self.directory.exists():
            return []
        with self._reader() as reader:
            return list(reader.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return max(steps) if steps else None

    def read_meta(self, step: int) -> dict:
        where = self.directory / str(step)
        try:
            with self._reader() as reader:
                meta = reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"cannot read the metadata of checkpoint {where} ({_short(e)}); "
                                  "the checkpoint is damaged: delete that step directory to resume from an "
                                  "earlier one") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a jaxdiff training checkpoint (format {FORMAT!r} expected)")
        return meta

    def restore(self, like: Any, identity: dict, data_identity: dict | None = None,
                step: int | None = None) -> tuple[Any, dict] | None:
        """The state saved at ``step`` (default: latest) shaped and sharded like ``like``, and its meta.

        Returns None when the directory holds no checkpoint. Raises CheckpointMismatchError when it
        belongs to another model or data set and CheckpointError when it is damaged.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        where = self.directory / str(step)
        meta = self.read_meta(step)
        diffs = _differences(meta["identity"], _jsonable(identity))
        if data_identity is not None:
            diffs += _differences(meta.get("data", {}).get("identity", {}), _jsonable(data_identity), "data.")
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint directory {self.directory} belongs to a different run: " + "; ".join(diffs[:8])
                + ("; ..." if len(diffs) > 8 else "") + ". Use a new directory for a new model or data set, "
                "or build the same model to resume.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            with self._reader() as reader:
                state = reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is damaged or unreadable ({_short(e)}); "
                                  "delete that step directory to resume from an earlier one") from e
        if tree_checksum(state) != meta["checksum"]:
            raise CheckpointError(f"checkpoint {where} is corrupted: its arrays do not match the checksum "
                                  "recorded when it was saved; delete that step directory to resume from "
                                  "an earlier one")
        return state, meta

    def save(self, step: int, state: Any, identity: dict, data: dict | None = None) -> None:
        """Save ``state`` as step ``step`` (asynchronously unless ``async_save=False``)."""
        if self._writer is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep,
                                                   enable_async_checkpointing=self.async_save)
            self._writer = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        meta = {"format": FORMAT, "step": int(step), "identity": _jsonable(identity),
                "data": _jsonable(data or {}), "checksum": tree_checksum(state)}
        self._writer.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.wait_until_finished()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
