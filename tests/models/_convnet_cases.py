"""Shared helpers of the convolutional-network parity tests (U-Net, pixel U-Net, VAE, ControlNet).

Fixtures are written by ``tests/models/fixtures/make_unet.py``: ``config.json``, the diffusers
weights (``model.safetensors``, PyTorch names and layout) and ``io.safetensors`` (inputs and
PyTorch outputs, NCHW).
"""
from __future__ import annotations

import json
from pathlib import Path
import tempfile
from typing import Any

import numpy as np
from safetensors.numpy import load_file

DATA = Path(__file__).resolve().parents[1] / "data" / "models"


def load_case(name: str) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(config dict, weights, inputs/outputs) of a committed fixture case."""
    d = DATA / name
    config = json.loads((d / "config.json").read_text())
    return config, load_file(str(d / "model.safetensors")), load_file(str(d / "io.safetensors"))


def live_case(name: str) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same case rebuilt now by diffusers, saved with ``save_pretrained`` and read back."""
    from tests.models.fixtures import make_unet

    kind, config, seed, io_fn = {**make_unet.cases(), **make_unet.live_only_cases()}[name]
    model = make_unet.build(kind, config, seed)
    io = {k: v.detach().float().numpy() for k, v in io_fn(model).items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
        weights = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            weights.update(load_file(str(f)))
    return config, weights, io


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def nchw(x: Any) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def assert_close(actual: Any, expected: np.ndarray, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max(1, max |expected|) (the project's parity bar)."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = rel * max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= bound, f"max abs diff {err:.3g} > {bound:.3g}"


def _apply(model: Any, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def apply(model: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a :class:`PureModel` (or bound method) under one shared ``jax.jit``.

    The weights are traced arguments, so the committed fixture and the live rebuild of a case
    (same shapes, other values) share one compilation.
    """
    global _JIT
    if _JIT is None:
        import jax

        _JIT = jax.jit(_apply)
    return _JIT(model, *args, **kwargs)


_JIT = None


def reference_param_count(cls_name: str, config: dict) -> int:
    """Parameter count of the diffusers model built on torch's meta device (no memory)."""
    import diffusers
    import torch

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**kwargs)
    return sum(p.numel() for p in model.parameters())


def load_config(name: str) -> dict:
    """A full-size public config shipped in ``jaxdiff/models/configs``."""
    path = Path(__file__).resolve().parents[2] / "jaxdiff" / "models" / "configs" / f"{name}.json"
    return json.loads(path.read_text())
