"""Checkpoints: exact resume after a real kill, keep-N, wrong model, damaged files, data parallel run."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff.train import CheckpointError, CheckpointMismatchError, CheckpointStore, fit, read_metrics
import run_scripts

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def script(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), **(env_extra or {}))
    return subprocess.run([sys.executable, str(HERE / "run_scripts.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def snapshot(directory):
    """Every file's relative path and content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run killed after step 6 (checkpoints every 4) and resumed to 8; and an uninterrupted run."""
    base = tmp_path_factory.mktemp("runs")
    killed = script("resume", base / "resumed", 8, 6)
    assert killed.returncode == 3, killed.stderr[-3000:]
    before_resume = read_metrics(base / "resumed" / "metrics.jsonl")
    trainer, init = run_scripts.build()
    fresh = jax.tree.map(lambda a: a.copy(), init)
    resumed = run_scripts.run(trainer, init, base / "resumed", 8)
    straight = run_scripts.run(trainer, fresh, base / "straight", 8)
    return base, trainer, before_resume, resumed, straight


def test_killed_and_resumed_run_is_exact(runs):
    base, _, before_resume, resumed, straight = runs
    assert [r["step"] for r in before_resume] == list(range(1, 7))  # it really died after step 6
    a, b = read_metrics(base / "resumed" / "metrics.jsonl"), read_metrics(base / "straight" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in b]
    assert [r["loss"] for r in before_resume] == [r["loss"] for r in b[:6]]
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keeps_the_newest_checkpoints_with_their_record(runs):
    base, *_ = runs
    store = CheckpointStore(base / "straight" / "checkpoints")
    assert store.steps() == [8]  # max_to_keep=1 removed step 4
    meta = store.read_meta(8)
    assert meta["step"] == 8 and meta["identity"]["config"] == {"hidden": 32}
    assert meta["data"]["position"] == {"epoch": 4, "index": 0}  # 2 batches per epoch
    assert meta["data"]["identity"]["batch_size"] == 16


def test_resume_from_another_model_raises_and_writes_nothing(runs, tmp_path):
    base, *_ = runs
    work = tmp_path / "run"
    shutil.copytree(base / "resumed", work)
    before = snapshot(work)
    other, state = run_scripts.build(hidden=48)
    with pytest.raises(CheckpointMismatchError, match=r"different run.*config.hidden.*32.*48"):
        run_scripts.run(other, state, work, 20, hidden=48)
    trainer, state = run_scripts.build()
    with pytest.raises(CheckpointMismatchError, match="config.hidden"):  # same shapes, other config
        run_scripts.run(trainer, state, work, 20, hidden=33)
    with pytest.raises(CheckpointMismatchError, match="data.batch_size"):  # other data: not the same run
        fit(trainer, state, run_scripts.dataset(batch_size=8), 20, workdir=work, model_config={"hidden": 32},
            progress=False)
    assert snapshot(work) == before


@pytest.mark.parametrize("damage", ["garble", "truncate", "meta", "checksum"])
def test_damaged_checkpoint_raises_naming_it_and_writes_nothing(runs, tmp_path, damage):
    base, trainer, *_ = runs
    work = tmp_path / "run"
    shutil.copytree(base / "resumed", work)
    step_dir = work / "checkpoints" / "8"
    meta_file = step_dir / "meta" / "metadata"
    if damage == "checksum":  # arrays that read back fine but differ from what was saved
        meta = json.loads(meta_file.read_text())
        meta["checksum"] = hashlib.sha256(b"other").hexdigest()
        meta_file.write_text(json.dumps(meta))
        targets = [meta_file]
    elif damage == "meta":
        targets = [meta_file]
    else:
        targets = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert targets
    for p in targets if damage != "checksum" else []:
        data = bytearray(p.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            mid = len(data) // 2
            data[mid:mid + 16] = bytes((b ^ 0x5A) for b in data[mid:mid + 16])
        p.write_bytes(bytes(data))
    before = snapshot(work)
    _, state = run_scripts.build()
    with pytest.raises(CheckpointError, match=str(step_dir)) as err:
        run_scripts.run(trainer, state, work, 20)
    assert "delete that step directory" in str(err.value) and len(str(err.value)) < 700
    assert snapshot(work) == before


def test_data_parallel_run_matches_single_device():
    out = script("parallel", env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(res["mesh"], res["single"], rtol=2e-5)
    assert res["mesh_replicated"] and res["mesh_devices"] == 8 and res["single_devices"] == 1
    assert res["batch_shard_rows"] == [4]  # 32 examples over 8 devices
    assert "not divisible by the 8 devices" in res["indivisible_error"]
    assert res["pmap_max_diff"] < 1e-5
