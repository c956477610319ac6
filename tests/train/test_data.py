"""Deterministic batches and the digits data set."""
import numpy as np
import pytest

from jaxdiff.train import ArrayDataset, MetricsLog, load_digits_dataset, read_metrics


def test_batches_are_a_function_of_seed_and_step():
    arrays = {"x": np.arange(50, dtype=np.float32)[:, None], "label": np.arange(50)}
    a, b = ArrayDataset(arrays, 8, seed=3), ArrayDataset(arrays, 8, seed=3)
    assert a.steps_per_epoch == 6
    # any access order gives the same batches
    for step in (13, 0, 7, 13, 40):
        np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
    epoch = np.concatenate([a.batch(s)["label"] for s in range(6)])
    assert len(set(epoch.tolist())) == 48  # a permutation, last partial batch dropped
    np.testing.assert_array_equal(a.batch(2)["x"][:, 0], a.batch(2)["label"])  # rows stay aligned
    assert not np.array_equal(epoch, np.concatenate([a.batch(s)["label"] for s in range(6, 12)]))
    assert not np.array_equal(a.batch(0)["x"], ArrayDataset(arrays, 8, seed=4).batch(0)["x"])
    assert a.position(13) == {"epoch": 2, "index": 1}
    with pytest.raises(ValueError, match="batch_size"):
        ArrayDataset(arrays, 51)


def test_metrics_log_drops_lines_past_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s)})
    log.close()
    MetricsLog(tmp_path / "m.jsonl", start_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_digits_dataset():
    pytest.importorskip("sklearn")
    train, held = load_digits_dataset()
    assert train["x"].shape == (1500, 8, 8, 1) and held["x"].shape == (297, 8, 8, 1)
    assert train["x"].dtype == np.float32 and train["label"].dtype == np.int32
    assert train["x"].min() == -1.0 and train["x"].max() == 1.0
    assert set(np.unique(train["label"])) == set(range(10))
    # the split is fixed and disjoint: held-out images are not in the training set
    train_rows = {r.tobytes() for r in train["x"]}
    assert sum(r.tobytes() in train_rows for r in held["x"]) < 5  # (digits has a few exact duplicates)
    again, _ = load_digits_dataset()
    np.testing.assert_array_equal(again["label"], train["label"])
