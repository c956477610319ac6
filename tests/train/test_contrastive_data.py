"""Hard-negative batches for contrastive training: every batch drawn from a few groups (jaxdiff.train.data)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.train.data import GroupedBatches


def test_grouped_batches_draw_few_groups_deterministically():
    groups = np.repeat(np.arange(6), [10, 10, 10, 10, 10, 3])  # group 5 is too small for 4 per group
    arrays = {"x": np.arange(53, dtype=np.float32)[:, None], "g": groups}
    a = GroupedBatches(arrays, groups, batch_size=8, groups_per_batch=2, seed=1)
    b = GroupedBatches(arrays, groups, batch_size=8, groups_per_batch=2, seed=1)
    seen = set()
    for step in (5, 0, 17, 5):
        batch = a.batch(step)
        np.testing.assert_array_equal(batch["x"], b.batch(step)["x"])  # a function of (seed, step)
        np.testing.assert_array_equal(groups[batch["x"][:, 0].astype(int)], batch["g"])  # rows stay aligned
        counts = np.unique(batch["g"], return_counts=True)
        assert len(counts[0]) == 2 and (counts[1] == 4).all()  # two groups, four each
        assert len(set(batch["x"][:, 0].tolist())) == 8  # no example twice
        seen.update(batch["g"].tolist())
    for step in range(40):
        seen.update(a.batch(step)["g"].tolist())
    assert seen == {0, 1, 2, 3, 4}  # every large-enough group is drawn, the small one never
    assert not np.array_equal(a.batch(0)["x"], GroupedBatches(arrays, groups, 8, 2, seed=2).batch(0)["x"])
    assert a.position(13) == {"epoch": 2, "index": 1} and a.identity()["groups_per_batch"] == 2
    with pytest.raises(ValueError, match="multiple of groups_per_batch"):
        GroupedBatches(arrays, groups, 8, 3)
    with pytest.raises(ValueError, match="only 5 groups"):
        GroupedBatches(arrays, groups, 24, 6)
    with pytest.raises(ValueError, match="one id per example"):
        GroupedBatches(arrays, groups[:-1], 8, 2)
