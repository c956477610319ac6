"""examples/digits_sd/train_personal.py's command line around its training run (the run itself is the recipes':
minutes of training, measured by benchmarks/personalisation.py)."""
from __future__ import annotations

import json

import pytest

from tests._examples import load_script


@pytest.fixture()
def personal():
    return load_script("examples/digits_sd/train_personal.py", "train_personal")


def test_install_prints_the_summary_with_where_it_installed(personal, tmp_path, monkeypatch, capsys):
    log = {"concept": {"style": "outline", "examples": 200}, "lora": {"seconds": 1.5, "loss_trace": [0.3, 0.2]}}
    monkeypatch.setattr(personal, "run", lambda out, methods, steps=None: dict(log))
    monkeypatch.setattr(personal, "install", lambda out: tmp_path / "digits-outline")
    personal.main(["--out", str(tmp_path), "--install"])
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"concept": {"style": "outline", "examples": 200}, "lora": {"seconds": 1.5},
                       "installed": {"digits-outline": str(tmp_path / "digits-outline")}}


def test_install_refuses_a_partial_run(personal, tmp_path):
    with pytest.raises(SystemExit):
        personal.main(["--out", str(tmp_path), "--methods", "lora", "--install"])
