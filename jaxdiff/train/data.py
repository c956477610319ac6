"""In-memory data: a batch iterator whose order is a pure function of (seed, step), and the digits set.

``ArrayDataset.batch(step)`` draws the ``step``-th batch of a run: epoch ``e = step // steps_per_epoch``
is a permutation seeded by ``(seed, e)`` (numpy's SeedSequence), so a resumed run sees the same data
as an uninterrupted one without storing any iterator state; :meth:`position` is what checkpoints record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Shuffled fixed-size batches (the last partial batch of each epoch is dropped) of equal-length arrays."""

    arrays: Mapping[str, np.ndarray]
    batch_size: int
    seed: int = 0
    _perm: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.arrays:
            raise ValueError("ArrayDataset needs at least one array, e.g. {'x': images}")
        arrays = {k: np.asarray(v) for k, v in self.arrays.items()}
        lengths = {k: a.shape[0] if a.ndim else None for k, a in arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"all arrays need the same leading (example) dimension, got lengths {lengths}")
        n = next(iter(lengths.values()))
        if not 0 < self.batch_size <= n:
            raise ValueError(f"batch_size must be between 1 and the number of examples ({n}), got {self.batch_size}")
        object.__setattr__(self, "arrays", arrays)

    @property
    def num_examples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def position(self, step: int) -> dict[str, int]:
        """Where the ``step``-th batch comes from: ``{"epoch": e, "index": i}`` (batch i of epoch e)."""
        return {"epoch": step // self.steps_per_epoch, "index": step % self.steps_per_epoch}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm.clear()
            self._perm[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
        return self._perm[epoch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The ``step``-th batch of the run (deterministic in (seed, step))."""
        pos = self.position(step)
        idx = self.permutation(pos["epoch"])[pos["index"] * self.batch_size:(pos["index"] + 1) * self.batch_size]
        return {k: a[idx] for k, a in self.arrays.items()}

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed run to see the same data (stored in checkpoints)."""
        spec = {k: [list(a.shape[1:]), str(a.dtype)] for k, a in self.arrays.items()}
        return {"num_examples": self.num_examples, "batch_size": self.batch_size, "seed": self.seed, "arrays": spec}


DIGITS_HELD_OUT = 297  # 1,797 images: 1,500 for training, 297 held out


def load_digits_dataset(held_out: int = DIGITS_HELD_OUT, seed: int = 0) -> tuple[dict, dict]:
    """scikit-learn's 8x8 digits as ``({"x", "label"} train, {"x", "label"} held-out)``.

    Images are float32 NHWC (N, 8, 8, 1) scaled from 0..16 to [-1, 1]; labels int32. The split is a
    fixed permutation (numpy seed ``seed``), the same on every machine.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    y = d.target.astype(np.int32)
    if not 0 < held_out < len(y):
        raise ValueError(f"held_out must be between 1 and {len(y) - 1}, got {held_out}")
    perm = np.random.default_rng(seed).permutation(len(y))
    test, train = perm[:held_out], perm[held_out:]
    return {"x": x[train], "label": y[train]}, {"x": x[test], "label": y[test]}


@dataclass(frozen=True, eq=False)
class GroupedBatches:
    """Batches drawn from a few groups at a time: ``groups_per_batch`` distinct groups (chosen with odds
    proportional to their size), ``batch_size // groups_per_batch`` examples of each, without replacement.

    For contrastive training this makes *hard negatives*: when every pair in a batch shares an attribute (e.g.
    the colours of a captioned digit), only the other attributes can tell the pairs apart. The ``step``-th
    batch is a pure function of ``(seed, step)`` (numpy's SeedSequence), so a resumed run sees the same
    batches; the interface is :class:`ArrayDataset`'s (``batch``, ``position``, ``identity``).
    """

    arrays: Mapping[str, np.ndarray]
    groups: np.ndarray
    batch_size: int
    groups_per_batch: int
    seed: int = 0
    _members: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        base = ArrayDataset(self.arrays, self.batch_size, self.seed)  # validates the arrays and batch size
        groups = np.asarray(self.groups)
        if groups.shape != (base.num_examples,):
            raise ValueError(f"groups must hold one id per example, shape ({base.num_examples},), "
                             f"got {groups.shape}")
        if self.groups_per_batch < 1 or self.batch_size % self.groups_per_batch:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of groups_per_batch "
                             f"({self.groups_per_batch})")
        per = self.batch_size // self.groups_per_batch
        members = tuple(np.flatnonzero(groups == g) for g in np.unique(groups))
        members = tuple(m for m in members if len(m) >= per)
        if len(members) < self.groups_per_batch:
            raise ValueError(f"only {len(members)} groups have at least {per} examples; need "
                             f"{self.groups_per_batch}: lower groups_per_batch or raise it with a smaller batch")
        object.__setattr__(self, "arrays", base.arrays)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "_members", members)

    @property
    def num_examples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def position(self, step: int) -> dict[str, int]:
        """``{"epoch": e, "index": i}``: the epoch in example counts (batches are drawn independently)."""
        return {"epoch": step // self.steps_per_epoch, "index": step % self.steps_per_epoch}

    def indices(self, step: int) -> np.ndarray:
        """The example indices of the ``step``-th batch, group by group."""
        rng = np.random.default_rng((self.seed, step))
        sizes = np.array([len(m) for m in self._members], np.float64)
        chosen = rng.choice(len(self._members), self.groups_per_batch, replace=False, p=sizes / sizes.sum())
        per = self.batch_size // self.groups_per_batch
        return np.concatenate([rng.choice(self._members[g], per, replace=False) for g in chosen])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The ``step``-th batch of the run (deterministic in (seed, step))."""
        idx = self.indices(step)
        return {k: a[idx] for k, a in self.arrays.items()}

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed run to see the same data (stored in checkpoints)."""
        spec = {k: [list(a.shape[1:]), str(a.dtype)] for k, a in self.arrays.items()}
        return {"num_examples": self.num_examples, "batch_size": self.batch_size, "seed": self.seed, "arrays": spec,
                "groups": int(len(np.unique(self.groups))), "groups_per_batch": self.groups_per_batch}
