"""One CPU device per core by default (jaxdiff.cpu_devices), and sampling split over them (jaxdiff.parallel):
the count's sources and precedence, and the same images from a two-device run (subprocesses) as from one device.
The two-device checks of jaxdiff.parallel (user start latents, any request pytree) share that run; eight devices and
jax.distributed are tests/test_parallel.py's."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jaxdiff import cpu_devices
from jaxdiff.parallel import mesh_shape

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
sys.path.insert(0, str(Path(__file__).parent))
import _cpu_devices_worker as worker  # noqa: E402


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", cpu_devices.ENV)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)
    return env


# ---- the count ----------------------------------------------------------------------------------

def test_count_is_one_per_core_unless_overridden():
    assert cpu_devices.choose_count({}, cores=6) == 6
    assert cpu_devices.choose_count({cpu_devices.ENV: "1"}, cores=6) == 1
    assert cpu_devices.choose_count({cpu_devices.ENV: " 3 "}, cores=6) == 3


def test_users_jax_setting_wins_over_jaxdiffs_default():
    flags = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", cpu_devices.ENV: "2"}
    assert cpu_devices.choose_count(flags, cores=6) is None
    assert cpu_devices.choose_count({cpu_devices.ENV: "2"}, cores=6, jax_setting=4) is None


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_override_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=cpu_devices.ENV):
        cpu_devices.choose_count({cpu_devices.ENV: bad}, cores=6)


def test_core_count_follows_the_affinity():
    assert cpu_devices.core_count() == len(os.sched_getaffinity(0))


def test_started_backend_is_left_alone_and_an_explicit_count_warns(monkeypatch):
    import jax

    jax.devices()  # the backend is up in this process
    have = len(jax.devices("cpu"))
    monkeypatch.setattr(cpu_devices, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_devices.configure() is None  # default: silently keeps the running count
        assert cpu_devices.configure(have) is None  # same count: nothing to say
    with pytest.warns(UserWarning, match="already runs with"):
        assert cpu_devices.configure(have + 1) is None
    assert len(jax.devices("cpu")) == have


@pytest.mark.parametrize("batch, devices, shape", [
    (1, 1, (1, 1)), (1, 2, (1, 2)), (2, 2, (2, 1)), (3, 2, (2, 1)), (1, 16, (1, 2)), (2, 16, (2, 2)), (3, 4, (3, 1)),
    (8, 4, (4, 1))])
def test_mesh_splits_images_then_cfg_halves(batch, devices, shape):
    data, cfg = mesh_shape(batch, devices)
    assert (data, cfg) == shape
    assert data * cfg <= min(devices, 2 * batch)  # never more devices than U-Net inputs


def test_affinity_of_two_cores_gives_two_devices_by_default():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    code = ("import os, sys; os.sched_setaffinity(0, {%d, %d}); import jax, jaxdiff; print(jax.device_count())"
            % tuple(cores[:2]))
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "2"


# ---- split sampling gives the single-device images -----------------------------------------------

CLI_RUNS = {
    "digits": ["--model", "digits", "--num", "3", "--steps", "4", "--seed", "5"],
    "sd": ["--prompt", "a red car", "--steps", "2", "--guidance", "5", "--height", "16", "--width", "16"],
}


def _cli(name: str, folder: Path, out: Path, devices: int) -> list[str]:
    args = CLI_RUNS[name] + (["--model", str(folder)] if name == "sd" else [])
    return ["sample", *args, "--out", str(out), "--no-progress", "--cpu-devices", str(devices)]


def _start(cmd: list[str], devices: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=_env(**{cpu_devices.ENV: devices}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _one_device(root: Path) -> dict:
    """The worker's images on this process's one device (mesh=None)."""
    import _tiny_sd

    from jaxdiff import builtin

    sd = _tiny_sd.build(root / "tok-one")
    one = {k: sd(p, mesh=None, **worker.TINY) for k, p in worker.PROMPTS.items()}
    one["digits"] = builtin.sample_builtin("digits", mesh=None, **worker.DIGITS)
    one["latents"] = sd(worker.LATENT_PROMPTS, mesh=None, latents=worker.start_latents(sd), **worker.LATENT_KW)
    return one


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """In subprocesses: the worker with JAXDIFF_CPU_DEVICES=2 (the longest, started first) and, where diffusers can
    write the SD folder, the CLI (digits, that diffusers SD folder) with --cpu-devices 2 against
    JAXDIFF_CPU_DEVICES=1. Meanwhile this process computes the worker's images on one device."""
    tmp = tmp_path_factory.mktemp("split")
    procs = {"worker": _start([sys.executable, worker.__file__, str(tmp / "w.npz"), str(tmp / "tok")], "2")}
    folder = None
    try:
        if importlib.util.find_spec("diffusers") is not None:
            import _sd_folders

            folder = _sd_folders.save(_sd_folders.build_pipeline(blocks=(8,), vae_blocks=(8, 8)), tmp / "tiny-sd")
            for name in CLI_RUNS:
                cmd = [sys.executable, "-m", "jaxdiff.cli", *_cli(name, folder, tmp / f"{name}.png", 2)]
                procs[name] = _start(cmd, "1")
        one = _one_device(tmp)
        logs = {}
        for k, p in procs.items():
            logs[k], _ = p.communicate(timeout=300)
            assert p.returncode == 0, f"{k}:\n{logs[k][-3000:]}"
    finally:
        for p in procs.values():  # after a failure here: stop the others
            if p.poll() is None:
                p.kill()
                p.communicate()
    return SimpleNamespace(tmp=tmp, folder=folder, logs=logs, one=one, split=dict(np.load(tmp / "w.npz")))


def test_split_sampling_gives_the_single_device_images(split_runs):
    """Tiny SD at batch 1 (CFG halves split) and 3 (images split, padded to 4), digits (CFG batch 6 split)."""
    r, one = split_runs.split, split_runs.one
    assert int(r["devices"]) == 2
    for k in ("tiny1", "tiny3", "digits"):
        v = one[k]
        assert v.std() > 0.01, k
        # digits: the network at batch 3 (per device) vs 6 differs by one float32 ulp (~1e-6) on one device already;
        # guidance 3 over 4 steps amplifies that to ~2e-5
        np.testing.assert_allclose(r[k], v, atol=5e-5 if k == "digits" else 1e-5, rtol=0, err_msg=k)


def test_one_image_runs_its_cfg_halves_on_two_devices(split_runs):
    """Batch 1 on two devices: each device's U-Net convolutions see one input (cond or uncond), not the pair."""
    assert split_runs.split["conv_batches_b1"].tolist() == [1]


def test_latents_split_over_devices_like_the_batch(split_runs):
    """jaxdiff.parallel pads and shards the latents with the rest of the batch (3 images on 2 devices)."""
    r, one = split_runs.split, split_runs.one["latents"]
    assert int(r["latents_mesh"]) == 2
    for k in ("latents_generate", "latents_pmap", "latents_default"):  # parallel.generate, pmap, the default split
        np.testing.assert_allclose(r[k], one, atol=1e-5, rtol=0, err_msg=k)


def test_any_request_pytree_is_split_along_its_declared_batch_axis(split_runs):
    """A non-SD request (batch on axis 1, a replicated field, a static tag) and a plain dict with an explicit prefix
    tree of axes, on 2 devices: each device holds half the (padded) batch; jit and pmap give the numpy result."""
    r = {k[len("shard_"):]: v for k, v in split_runs.split.items() if k.startswith("shard_")}
    assert int(r["devices"]) == 2 and int(r["n"]) == 5
    assert tuple(r["x_shard"]) == (3, 3) and tuple(r["w_shard"]) == (3,)  # (3, 5) padded to (3, 6), split on axis 1
    assert tuple(r["dict_b_shard"]) == (2, 3)
    for k in ("jit", "pmap"):
        np.testing.assert_allclose(r[k], r["ref"], rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(r["dict"], r["dict_ref"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_cli_cpu_devices_flag_splits_and_keeps_the_images(split_runs, name, tmp_path, capsys):
    from jaxdiff.cli import main

    if split_runs.folder is None:
        pytest.skip("needs diffusers (the SD folder)")
    tmp, logs = split_runs.tmp, split_runs.logs
    assert json.loads(logs[name].strip().splitlines()[-1])["cpu_devices"] == 2  # the flag beat JAXDIFF_CPU_DEVICES=1
    assert main(_cli(name, split_runs.folder, tmp_path / "one.png", 1)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cpu_devices"] == 1
    a = np.asarray(Image.open(tmp / f"{name}.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "one.png"), np.int16)
    assert a.shape == b.shape and b.std() > 1
    assert np.abs(a - b).max() <= 1  # float differences of ~1e-6 may round one 8-bit level apart
