"""benchmarks/text_to_image_quality.py: its prompt pairs and floor set are what it says, and a tiny run on the
shipped digits-sd / digits-clip writes every figure issue 11 asks for."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from benchmarks import text_to_image_quality as t2i  # noqa: E402
from jaxdiff import builtin  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402

pytestmark = pytest.mark.xla_optimized  # runs its programs more than it compiles them (tests/conftest.py)


@pytest.fixture(scope="module")
def sets():
    return dt.load_digits_text()


def test_thin_and_thick_prompts_differ_only_in_the_thickness_word(sets):
    thin, thick, labels = t2i.thickness_prompts(sets["held_out"], 30)
    assert len(thin) == len(thick) == len(labels) == 30
    for a, b, label in zip(thin, thick, labels):
        pa, pb = dt.parse_caption(a), dt.parse_caption(b)
        assert (pa["thickness"], pb["thickness"]) == ("thin", "thick") and pa["label"] == pb["label"] == label
        assert {k: v for k, v in pa.items() if k != "thickness"} == {k: v for k, v in pb.items() if k != "thickness"}
        wa, wb = a.split(), b.split()
        assert len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb)) == 1


def test_floor_set_is_unseen_by_the_judge_with_the_held_out_labels(sets):
    judge_train = builtin.builtin_config("digits-eval")["training"]["train_images"]
    floor = t2i.floor_set(sets, judge_train)
    np.testing.assert_array_equal(floor["label"], sets["held_out"]["label"])
    assert floor["source"].min() >= judge_train and len(np.unique(floor["source"])) == len(floor["source"])


def test_tiny_run_reports_every_target(tmp_path):
    out = tmp_path / "t2i.json"
    t2i.main(["--num", "12", "--pairs", "4", "--combos", "12", "--scales", "1,3", "--steps", "8", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["targets"]) == set(t2i.TARGETS) and res["best_guidance"] == 3.0
    assert [r["guidance"] for r in res["sweep"]] == [1.0, 3.0] and res["heldout_combination_prompts"] == 12
    for key in t2i.TARGETS:
        assert np.isfinite(res[key]), key
    assert res["vae_recon_psnr_db"] > 24 and res["prompt_colour_accuracy"] > 0.5  # trained weights, not noise
    for name in res["pictures"].values():
        assert (tmp_path / name).exists()
    assert "| `fd_vs_floor` | <= 2 |" in out.with_suffix(".md").read_text()
