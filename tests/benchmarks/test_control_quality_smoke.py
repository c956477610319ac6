"""benchmarks/control_quality.py: its pairs are what it says (prompt and control of one class, never the same
digit), real digits read back as the measure claims, and a tiny run on the shipped networks writes every figure."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from benchmarks import control_quality as cq  # noqa: E402
from benchmarks.sample_quality import Judge  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402


@pytest.fixture(scope="module")
def held():
    return dt.load_digits_text()["held_out"]


def test_pairs_share_the_class_never_the_digit(held):
    pairs = cq.eval_pairs(held, 60)
    labels = np.asarray(held["label"])
    np.testing.assert_array_equal(labels[pairs["control_index"]], labels[pairs["prompt_index"]])
    assert np.all(pairs["control_index"] != pairs["prompt_index"])
    assert [dt.parse_caption(p)["label"] for p in pairs["prompts"]] == list(pairs["label"])
    assert pairs["control"].shape == (60, 32, 32, 3) and set(np.unique(pairs["control"])) == {0.0, 1.0}
    np.testing.assert_array_equal(pairs["control"][..., 0] > 0.5, pairs["edges"])


def test_real_digits_read_back_as_their_prompts(held):
    """The prompts' own digits score as a perfect generator would on digit and colours, and agree with their own
    edges exactly: the read-back is sound before any model is judged."""
    pairs = cq.eval_pairs(held, 40)
    real = held["image"][pairs["prompt_index"]]
    r = cq.read_back(real, pairs, Judge())
    assert r["colour_accuracy"] == 1.0 and r["prompt_accuracy"] >= 0.95 and r["edge_f1_vs_prompt_digit"] == 1.0
    assert 0.3 < r["edge_f1"] < 0.9  # another digit of the class: partly the same edges


def test_tiny_run_reports_every_target(tmp_path):
    out = tmp_path / "control.json"
    cq.main(["--num", "8", "--steps", "8", "--scales", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["targets"]) == set(cq.TARGETS)
    for key in cq.TARGETS:
        assert np.isfinite(res[key]), key
    assert res["controlnet_edge_f1"] > res["none"]["edge_f1"]  # the trained ControlNet follows the edges
    assert res["controlnet_training_curve"] and res["adapter_training_curve"]
    for name in res["pictures"].values():
        assert (tmp_path / name).exists()
    assert "| `controlnet_edge_f1` | >= 0.6 |" in out.with_suffix(".md").read_text()
