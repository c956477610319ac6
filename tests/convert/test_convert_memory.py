"""Loading a model folder fills the module from the lazy file: no second copy of the weights."""
from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

LAYERS, WIDTH = 24, 1024  # 100 MB of float32 parameters
PROBE = Path(__file__).with_name("_convert_memory_probe.py")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mem")
    (folder / "config.json").write_text(json.dumps({"_class_name": "Stack", "layers": LAYERS, "width": WIDTH}))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(LAYERS):
        tensors[f"layers.{i}.weight"] = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal((WIDTH,), dtype=np.float32)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _probe(path: Path, dtype: str, *extra: str) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(PROBE), str(path), dtype, *extra],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak"], result["param_bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_close_to_parameter_bytes(checkpoint, dtype):
    peak, param_bytes = _probe(checkpoint, dtype)
    assert param_bytes == LAYERS * (WIDTH * WIDTH + WIDTH) * np.dtype(dtype if dtype == "float32" else "float16").itemsize
    assert peak <= 1.3 * param_bytes, f"peak {peak / 1e6:.1f} MB for {param_bytes / 1e6:.1f} MB of parameters"


def test_measurement_sees_mapped_pages(checkpoint):
    """Without releasing mapped pages the whole file stays resident: the probe must notice (~2x)."""
    peak, param_bytes = _probe(checkpoint, "float32", "--no-release")
    assert peak > 1.6 * param_bytes
