"""Write jaxdiff networks as diffusers / transformers model folders (the inverse of loading).

jaxdiff's parameter paths mirror the reference checkpoint names, so exporting is the loader's rule run
backwards: ``kernel`` / ``scale`` / ``embedding`` become ``weight`` and kernels go back to PyTorch's
layouts (Linear ``(out, in)``, Conv ``(out, in, H, W)``). :func:`save_pretrained` writes ``config.json`` and a
safetensors file (never pickle) that ``CLIPModel.from_pretrained(folder)`` or
``UNet2DConditionModel.from_pretrained(folder)`` read as their own, and that
:func:`jaxdiff.convert.load_model_folder` reads back bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from pathlib import Path
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.safetensors_io import DTYPES
from jaxdiff.convert.torch_layout import checkpoint_name, parameter_kind, to_torch_layout

LIBRARIES = ("transformers", "diffusers")
WEIGHTS_FILE = {"transformers": "model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}
_SAFETENSORS_NAMES = {dt: name for name, dt in DTYPES.items()}


def torch_state_dict(module: nnx.Module, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """PyTorch name -> array in PyTorch layout (host numpy), for every variable of ``module`` but random streams.

    ``dtype`` casts the floating tensors (integer buffers keep theirs). Raises if two parameters would get the
    same name or the module is abstract (built by :func:`jaxdiff.convert.abstract`, no values yet).
    """
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(module)):
        if isinstance(var, nnx.RngState):  # dropout keys: not part of a checkpoint, as in the loader
            continue
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError("the module is abstract (shapes only): export a module with values, e.g. one loaded "
                             "with load_model_folder or built with nnx.Rngs.")
        name = checkpoint_name(path)
        if name in out:
            raise ValueError(f"two parameters map to the checkpoint name {name!r}; rename one of them in the module.")
        array = np.asarray(to_torch_layout(np.asarray(value), parameter_kind(path)))
        if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(jnp.dtype(dtype))
        out[name] = np.array(array, order="C")  # (np.ascontiguousarray would make a 0-d logit_scale 1-d)
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` in the safetensors format: an 8-byte little-endian header length, the JSON header
    (``dtype``, ``shape``, ``data_offsets`` per tensor, sorted by name, plus ``__metadata__``), then the raw
    little-endian bytes. Handles bfloat16 and the float8 types (``ml_dtypes``), which numpy writers do not."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        kind = _SAFETENSORS_NAMES.get(np.dtype(dt))
        if kind is None:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store; "
                             f"cast it to one of {', '.join(str(d) for d in DTYPES.values())}.")
        data = np.ascontiguousarray(array, dtype=dt).tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes, as the reference writer does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)  # a crash never leaves a truncated file under the final name
    return path


def _library(config: Mapping[str, Any], library: str | None) -> str:
    if library is not None:
        if library not in LIBRARIES:
            raise ValueError(f"library={library!r} is not supported; use one of {LIBRARIES}.")
        return library
    if "_class_name" in config or "_diffusers_version" in config:
        return "diffusers"
    if "model_type" in config or "architectures" in config:
        return "transformers"
    raise ValueError("cannot tell whether config_dict is a diffusers or a transformers config (it has none of "
                     "_class_name, model_type, architectures): pass library='diffusers' or 'transformers'.")


def _default_config(module: nnx.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise ValueError(f"{type(module).__name__} has no config that writes itself as config.json: pass config_dict "
                     "(the reference config, e.g. the dict read from the folder the model was loaded from).")


def export_config(config_dict: Mapping[str, Any], class_name: str, library: str) -> dict[str, Any]:
    """``config_dict`` with the class recorded as each library reads it: diffusers' ``_class_name``,
    transformers' ``architectures``."""
    config = dict(config_dict)
    if library == "diffusers":
        config["_class_name"] = class_name
        config.setdefault("_diffusers_version", _version("diffusers"))
    else:
        config["architectures"] = [class_name]
        config.setdefault("transformers_version", _version("transformers"))
    return config


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "0.0.0"


def _json_ready(value: Any) -> Any:
    """Tuples (frozen config lists) -> lists, dataclasses -> dicts, numpy scalars -> Python."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_pretrained(module: nnx.Module, folder: str | os.PathLike, config_dict: Mapping[str, Any] | None = None, *,
                    class_name: str | None = None, library: str | None = None, dtype: Any = None) -> Path:
    """Write ``folder/config.json`` and the safetensors weights of ``module`` in PyTorch names and layouts.

    ``config_dict`` is the reference config (default: ``module.config.to_dict()`` where the config has one, as
    :class:`jaxdiff.models.clip.CLIPConfig` does); ``class_name`` the reference class (default: the config's
    ``_class_name`` / ``architectures``, else the module's class name); ``library`` is inferred from the config
    (``_class_name`` -> diffusers, ``model_type`` -> transformers). Works for any jaxdiff network whose parameter
    paths mirror the checkpoint's names (all of jaxdiff's loaders' targets). Returns the weights' path.
    """
    config = _default_config(module) if config_dict is None else dict(config_dict)
    lib = _library(config, library)
    if class_name is None:
        arch = config.get("architectures")
        class_name = config.get("_class_name") or (arch[0] if isinstance(arch, list) and arch else None)
        class_name = class_name or type(module).__name__
    tensors = torch_state_dict(module, dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = export_config(config, class_name, lib)
    (folder / "config.json").write_text(json.dumps(_json_ready(config), indent=2, sort_keys=True) + "\n")
    return write_safetensors(folder / WEIGHTS_FILE[lib], tensors, {"format": "pt"})
