"""Data-parallel sampling: identical images for identical seeds on 1 and 8 devices, padding, FSDP, pmap, and
two processes joined by jax.distributed (forced CPU devices, each in its own subprocess). Two devices are
tests/test_cpu_devices.py's (the batch split over JAXDIFF_CPU_DEVICES=2, the CFG halves of one image, user start
latents, any request pytree split on its batch axes)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent / "pipelines"
sys.path.insert(0, str(HERE))
import _parallel_worker as worker  # noqa: E402
import _tiny_sd  # noqa: E402

ROOT = Path(__file__).parents[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(devices: int, out: Path, tok: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "_parallel_worker.py"), str(out), str(tok), *extra],
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(p: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 8-device run (5 images padded to 8) and the two-process distributed run (4 devices each) together;
    while they run, sample the same images in this process (one device, without any mesh: "single")."""
    tmp = tmp_path_factory.mktemp("par")
    port = str(_free_port())
    procs = {n: _start(n, tmp / f"d{n}.npz", tmp / f"tok{n}") for n in (8,)}
    dist = [_start(4, tmp / "dist.npz", tmp / "tokd", str(i), "2", port) for i in range(2)]
    try:
        single = _tiny_sd.build(tmp / "tok1")(worker.PROMPTS, **worker.KW)
        for p in [*procs.values(), *dist]:
            _wait(p)
    finally:
        for p in [*procs.values(), *dist]:  # after a failure here: stop the others
            if p.poll() is None:
                p.kill()
                p.communicate()
    out = {n: dict(np.load(tmp / f"d{n}.npz")) for n in procs}
    out["dist"] = dict(np.load(tmp / "dist.npz"))
    out["single"] = single
    return out


@pytest.fixture(scope="module")
def single(runs):
    """The same images in this process (one device), without any mesh."""
    return runs["single"]


@pytest.mark.parametrize("devices", [8])
def test_same_images_for_same_seeds_on_any_device_count(runs, single, devices):
    r = runs[devices]
    assert int(r["devices"]) == devices
    assert r["jit"].shape == single.shape == (5, 8, 8, 3)  # 5 images: padded to 6 or 8, then trimmed
    assert single.std() > 0.01
    for mode in ("jit", "fsdp", "pmap"):
        np.testing.assert_allclose(r[mode], single, atol=1e-5, rtol=0, err_msg=mode)


def test_two_processes_with_jax_distributed(runs, single):
    r = runs["dist"]
    assert int(r["devices"]) == 8  # 2 processes x 4 devices
    np.testing.assert_allclose(r["jit"], single, atol=1e-5, rtol=0)


def test_pad_batch_repeats_last():
    from jaxdiff.parallel import pad_batch

    a = np.arange(5)[:, None]
    np.testing.assert_array_equal(pad_batch(a, 4)[:, 0], [0, 1, 2, 3, 4, 4, 4, 4])
    assert pad_batch(a, 5) is a


def test_fsdp_splits_large_arrays_only():
    import jax

    from jaxdiff.parallel import make_mesh, param_sharding

    mesh = make_mesh(jax.devices()[:1])
    assert param_sharding(np.zeros((4, 4)), mesh, fsdp=True, min_size=1).spec == jax.sharding.PartitionSpec()


def test_one_auto_mesh_helper_for_sampling_and_training():
    """A caller's Explicit mesh becomes Auto (same devices, names); training uses parallel's helper."""
    import jax
    from jax.sharding import AxisType

    from jaxdiff import parallel
    from jaxdiff.train import step

    explicit = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:1])
    auto = parallel.auto_mesh(explicit)
    assert auto.axis_types == (AxisType.Auto,) and auto.axis_names == ("data",)
    assert list(auto.devices.flat) == list(explicit.devices.flat)
    assert step.auto_mesh is parallel.auto_mesh


def test_batch_axes_are_declared_by_the_request_class():
    import jax.numpy as jnp

    from jaxdiff import parallel
    from jaxdiff.pipelines.stable_diffusion import Request

    ids = jnp.zeros((3, 4), jnp.int32)
    req = Request(ids, ids, jnp.zeros(3, jnp.uint32), jnp.ones(3), 0.0, None, 1.0, 0, image=jnp.zeros((3, 8, 8, 3)))
    axes = parallel.batch_axes(req)
    assert (axes.ids, axes.seeds, axes.image, axes.mask, axes.sigmas, axes.start) == (0, 0, 0, 0, None, None)
    assert parallel.batch_size(req) == 3
    with pytest.raises(ValueError, match="one batch size"):
        parallel.batch_size({"a": np.zeros(3), "b": np.zeros(4)}, {"a": 0, "b": 0})
    with pytest.raises(TypeError, match="axes="):
        parallel.batch_axes({"a": np.zeros(3)})
    np.testing.assert_array_equal(parallel.pad_batch(np.arange(6).reshape(2, 3), 2, axis=1),
                                  [[0, 1, 2, 2], [3, 4, 5, 5]])
