"""benchmarks/editing_quality.py: the parts' figures land in one report, every part's targets are checked, and an
unknown part is refused by name."""
import types

import pytest

from benchmarks import editing_quality as E  # noqa: E402


def fake_part(key: str, value: float, bound: float):
    return types.SimpleNamespace(run=lambda num=None, seeds=None: {key: value, f"{key}_num": num},
                                 TARGETS={key: (">=", bound)},
                                 markdown=lambda r: [f"## {key}", f"{key} = {r[key]}"])


def test_parts_merge_and_targets_are_checked(monkeypatch, tmp_path):
    parts = {"p2p": fake_part("a_score", 0.95, 0.9), "sdg": fake_part("b_score", 0.5, 0.8)}
    monkeypatch.setattr(E, "part", parts.__getitem__)
    results = E.main(["--parts", "p2p,sdg", "--num", "7", "--json", str(tmp_path / "r.json")])
    assert results["a_score_num"] == results["b_score_num"] == 7
    assert results["targets"]["a_score"]["met"] and not results["targets"]["b_score"]["met"]
    md = (tmp_path / "r.md").read_text()
    assert "a_score = 0.95" in md and "b_score = 0.5" in md and md.index("## a_score") < md.index("## b_score")


def test_unknown_parts_are_named(capsys):
    with pytest.raises(SystemExit):
        E.main(["--parts", "p2p,dreambooth"])
    assert "dreambooth" in capsys.readouterr().err


def test_unmeasured_and_nested_figures_are_in_the_targets(monkeypatch):
    nested = fake_part("c_score", 0.7, 0.5)
    nested.run = lambda num=None, seeds=None: {"palette": {"c_score": 0.7}}
    parts = {"palette": nested, "p2p": fake_part("a_score", 0.95, 0.9)}
    parts["p2p"].TARGETS = {"a_score": (">=", 0.9), "never_measured": (">=", 30.0)}
    monkeypatch.setattr(E, "part", parts.__getitem__)
    t = E.run(("palette", "p2p"))["targets"]
    assert t["c_score"]["met"] and t["a_score"]["met"]
    assert t["never_measured"] == {"target": ">= 30", "value": None, "met": False}


def test_update_reruns_one_part_and_keeps_the_others(monkeypatch, tmp_path):
    parts = {"p2p": fake_part("a_score", 0.5, 0.9), "sdg": fake_part("b_score", 0.85, 0.8)}
    monkeypatch.setattr(E, "part", parts.__getitem__)
    path = str(tmp_path / "r.json")
    E.main(["--parts", "p2p,sdg", "--json", path])
    parts["p2p"] = fake_part("a_score", 0.95, 0.9)  # the part improved; sdg is not rerun
    parts["sdg"] = fake_part("b_score", 0.0, 0.8)
    r = E.main(["--parts", "p2p", "--update", "--json", path])
    assert r["parts"] == ["p2p", "sdg"] and r["a_score"] == 0.95 and r["b_score"] == 0.85
    assert r["targets"]["a_score"]["met"] and r["targets"]["b_score"]["met"]
    assert set(r["part_seconds"]) == {"p2p", "sdg"} and r["updated_parts"] == ["p2p"]
    assert "b_score = 0.85" in (tmp_path / "r.md").read_text()
    r = E.main(["--parts", "sdg", "--update", "--json", path])  # a second rerun: both parts are now rerun ones
    assert r["updated_parts"] == ["p2p", "sdg"] and r["b_score"] == 0.0
    assert r["a_score"] == 0.95 and not r["targets"]["b_score"]["met"]
    with pytest.raises(SystemExit):
        E.main(["--parts", "p2p", "--update", "--json", str(tmp_path / "missing.json")])


def test_update_drops_the_figures_a_rerun_part_no_longer_reports(monkeypatch, tmp_path):
    first = fake_part("a_score", 0.5, 0.9)
    first.run = lambda num=None, seeds=None: {"a_score": 0.5, "a_old_diagnostic": 1.0}
    parts = {"p2p": first, "sdg": fake_part("b_score", 0.85, 0.8)}
    monkeypatch.setattr(E, "part", parts.__getitem__)
    path = str(tmp_path / "r.json")
    E.main(["--parts", "p2p,sdg", "--json", path])
    parts["p2p"] = fake_part("a_score", 0.95, 0.9)
    r = E.main(["--parts", "p2p", "--update", "--json", path])
    assert "a_old_diagnostic" not in r and r["a_score"] == 0.95 and r["b_score"] == 0.85
    assert r["part_keys"] == {"p2p": ["a_score", "a_score_num"], "sdg": ["b_score", "b_score_num"]}
