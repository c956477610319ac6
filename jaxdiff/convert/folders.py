"""Read diffusers pipeline folders and single safetensors files into jaxdiff networks.

A pipeline folder (what ``DiffusionPipeline.save_pretrained`` writes) holds ``model_index.json``,
mapping each component name to ``[library, class]``, and one subfolder per component: networks
with ``config.json`` and safetensors weights (``diffusion_pytorch_model.safetensors`` or
``model.safetensors``, an ``.fp16`` variant, or a sharded ``*.safetensors.index.json``), schedulers
with ``scheduler_config.json``, tokenizers with their vocabulary files. Networks are built
abstractly and filled one tensor at a time from the memory-mapped file (no second full copy).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
import importlib
import inspect
import json
import os
from pathlib import Path
import typing
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.safetensors_io import (
    PickleCheckpointError,
    SafetensorsError,
    is_pickle_path,
    open_safetensors,
    pickle_refusal_message,
    refuse_pickle,
)
from jaxdiff.convert.torch_layout import build_from_tensors

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
SUPPORTED_DTYPES = {np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)}


class MissingComponentsError(FileNotFoundError):
    """A pipeline folder lacks required components; ``problems`` lists every one of them."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder, self.problems = folder, problems
        lines = [f"pipeline folder {folder} cannot be loaded: {len(problems)} required component(s) missing or unusable:"]
        lines += [f"  - {p}" for p in problems]
        lines.append("  re-save the complete pipeline with save_pretrained(..., safe_serialization=True), "
                     "or copy the missing subfolders from the original model.")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Registry: reference class name -> jaxdiff network (resolved lazily, so it may name modules that
# do not exist yet; resolution fails with a clear error only when the network is needed).


@dataclass(frozen=True)
class NetworkSpec:
    """Where the jaxdiff network compatible with a reference class lives: module path and class."""

    module: str
    name: str

    def resolve(self) -> type:
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name is None or not self.module.startswith(e.name):
                raise  # a genuine import error inside the module
            raise NotImplementedError(f"jaxdiff has no {self.module} module (needed for {self.name}) in this version") from None
        try:
            return getattr(mod, self.name)
        except AttributeError:
            raise NotImplementedError(f"{self.module} defines no class {self.name}") from None


REGISTRY: Mapping[str, NetworkSpec] = {
    "UNet2DConditionModel": NetworkSpec("jaxdiff.models.unet", "UNet2DConditionModel"),
    "AutoencoderKL": NetworkSpec("jaxdiff.models.vae", "AutoencoderKL"),
    "ControlNetModel": NetworkSpec("jaxdiff.models.controlnet", "ControlNetModel"),
    "T2IAdapter": NetworkSpec("jaxdiff.models.t2i_adapter", "T2IAdapter"),
    "UNet2DModel": NetworkSpec("jaxdiff.models.unet2d", "UNet2DModel"),
    "CLIPTextModel": NetworkSpec("jaxdiff.models.clip", "CLIPTextModel"),
    "CLIPTextModelWithProjection": NetworkSpec("jaxdiff.models.clip", "CLIPTextModelWithProjection"),
    "CLIPVisionModelWithProjection": NetworkSpec("jaxdiff.models.clip", "CLIPVisionModelWithProjection"),
    "CLIPModel": NetworkSpec("jaxdiff.models.clip", "CLIPModel"),
    "T5EncoderModel": NetworkSpec("jaxdiff.models.t5", "T5EncoderModel"),
    "DiTTransformer2DModel": NetworkSpec("jaxdiff.models.dit", "DiTTransformer2DModel"),
    "UNet3DConditionModel": NetworkSpec("jaxdiff.models.unet3d", "UNet3DConditionModel"),
    "DPTForDepthEstimation": NetworkSpec("jaxdiff.models.dpt", "DPTForDepthEstimation"),
    "PriorTransformer": NetworkSpec("jaxdiff.models.prior", "PriorTransformer"),
    "UnCLIPTextProjModel": NetworkSpec("jaxdiff.models.unclip_text_proj", "UnCLIPTextProjModel"),
}

FAMILIES: Mapping[str, str] = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "controlnet": "ControlNetModel",
    "unet2d": "UNet2DModel",
    "clip_text": "CLIPTextModel",
    "clip_text_projection": "CLIPTextModelWithProjection",
    "clip_vision": "CLIPVisionModelWithProjection",
    "clip": "CLIPModel",
    "t5": "T5EncoderModel",
    "dit": "DiTTransformer2DModel",
    "unet3d": "UNet3DConditionModel",
    "dpt": "DPTForDepthEstimation",
    "prior": "PriorTransformer",
    "unclip_text_proj": "UnCLIPTextProjModel",
}


def network_class(class_name: str, registry: Mapping[str, NetworkSpec] | None = None) -> type:
    """The jaxdiff class for a reference class name (``UNet2DConditionModel``) or family (``unet``)."""
    table = {**REGISTRY, **(registry or {})}
    class_name = FAMILIES.get(class_name, class_name)
    if class_name not in table:
        raise NotImplementedError(
            f"jaxdiff has no network for {class_name!r}; supported: {', '.join(sorted(table))} "
            f"(or the short names {', '.join(FAMILIES)})"
        )
    return table[class_name].resolve()


# ---------------------------------------------------------------------------------------------
# Building a network from a config dict and a (lazy) tensor mapping.


def resolve_dtype(dtype: Any) -> np.dtype:
    """float32 / bfloat16 / float16 (also as the strings "fp32", "bf16", "fp16")."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    if isinstance(dtype, str):
        dtype = aliases.get(dtype, dtype)
    try:
        resolved = np.dtype(jnp.dtype(dtype))
    except TypeError:
        resolved = None
    if resolved not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use jnp.float32, jnp.bfloat16 or jnp.float16")
    return resolved


def config_class(cls: type) -> type:
    """The config dataclass of a network: ``cls.config_class``, the type of ``__init__``'s ``config``,
    or ``<Name>Config`` / ``<Name without Model>Config`` in the same module."""
    explicit = getattr(cls, "config_class", None)
    if explicit is not None:
        return explicit
    try:
        hint = typing.get_type_hints(cls.__init__).get("config")
    except Exception:  # unresolvable annotations: fall back to naming conventions
        hint = None
    if inspect.isclass(hint) and hasattr(hint, "from_dict"):
        return hint
    mod = importlib.import_module(cls.__module__)
    for name in (f"{cls.__name__}Config", f"{cls.__name__.removesuffix('Model')}Config"):
        if hasattr(getattr(mod, name, None), "from_dict"):
            return getattr(mod, name)
    raise TypeError(f"cannot find the config class of {cls.__module__}.{cls.__name__} (set config_class on it)")


def _hook(cls: type, name: str, default: Any) -> Any:
    """A conversion hook (``rename_torch_key``, ``IGNORED_TORCH_KEYS``) from the class or its module."""
    if hasattr(cls, name):
        return getattr(cls, name)
    return getattr(importlib.import_module(cls.__module__), name, default)


def _dtype_kwargs(fn: Any, dtype: np.dtype) -> dict[str, np.dtype]:
    """``dtype`` (compute) and, where the function takes it, ``param_dtype`` (storage): both ``dtype``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.name == "param_dtype" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"dtype": dtype, "param_dtype": dtype}
    return {"dtype": dtype}


def build_network(cls: type, config: Mapping[str, Any], tensors: Mapping[str, Any], *, dtype: Any = jnp.float32) -> nnx.Module:
    """Build ``cls`` from a reference config dict without allocating, then fill it from ``tensors``.

    Uses ``cls.from_pretrained_tensors`` where the network defines one; otherwise
    :func:`~jaxdiff.convert.torch_layout.build_from_tensors` (``XConfig.from_dict``, abstract build, fill) with the
    network's ``rename_torch_key`` / ``IGNORED_TORCH_KEYS``. Parameters are stored and computed in ``dtype``.
    """
    dtype = resolve_dtype(dtype)
    custom = getattr(cls, "from_pretrained_tensors", None)
    if callable(custom):
        return custom(dict(config), tensors, **_dtype_kwargs(custom, dtype))
    return build_from_tensors(cls, config_class(cls), dict(config), tensors,
                              rename=_hook(cls, "rename_torch_key", None), ignore=_hook(cls, "IGNORED_TORCH_KEYS", ()),
                              dtype=dtype, param_dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Folders.


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _weight_names(variant: str | None) -> list[str]:
    if variant is None:
        return [n for s in WEIGHT_STEMS for n in (f"{s}.safetensors", f"{s}.safetensors.index.json")]
    return [n for s in WEIGHT_STEMS for n in (f"{s}.{variant}.safetensors", f"{s}.safetensors.index.{variant}.json")]


def find_weights(directory: str | os.PathLike, variant: str | None = None) -> Path:
    """The safetensors weights of one model folder: a single file or a shard index.

    ``variant=None`` prefers the plain files and falls back to the ``fp16`` variant; a named
    variant (``"fp16"``) must exist. Folders holding only pickle weights are refused.
    """
    directory = Path(directory)
    for v in ([variant] if variant is not None else [None, "fp16"]):
        for name in _weight_names(v):
            if (directory / name).is_file():
                return directory / name
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    pickles = [n for n in present if is_pickle_path(n) or n.endswith((".bin.index.json", ".pt.index.json"))]
    if pickles:
        raise PickleCheckpointError(pickle_refusal_message(directory / pickles[0]))
    wanted = ", ".join(_weight_names(variant) if variant else _weight_names(None) + _weight_names("fp16"))
    raise FileNotFoundError(f"no safetensors weights in {directory} (looked for {wanted}; found: {', '.join(present) or 'nothing'})")


def component_kind(class_name: str | None) -> str:
    """``scheduler``, ``tokenizer``, ``processor`` or ``model`` (config.json + weights)."""
    name = class_name or ""
    if name.endswith("Scheduler"):
        return "scheduler"
    if "Tokenizer" in name:
        return "tokenizer"
    if name.endswith(("ImageProcessor", "FeatureExtractor", "Processor", "ImageProcessorPil")):
        return "processor"
    return "model"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class PipelineFolder:
    """The contents of ``model_index.json``: component name -> (library, class); other keys as attributes."""

    root: Path
    class_name: str | None
    components: Mapping[str, tuple[str | None, str | None]]
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def present(self) -> list[str]:
        """Components with a non-null entry."""
        return [n for n, (_, c) in self.components.items() if c is not None]


def read_model_index(folder: str | os.PathLike) -> PipelineFolder:
    """Parse ``folder/model_index.json``."""
    root = Path(folder)
    if not root.is_dir():
        if root.exists() and is_pickle_path(root):
            refuse_pickle(root)
        raise FileNotFoundError(f"{root} is not a folder")
    index = root / "model_index.json"
    if not index.is_file():
        hint = " It looks like a single model folder: use load_model_folder." if (root / "config.json").is_file() else ""
        raise FileNotFoundError(f"{root} has no model_index.json, so it is not a diffusers pipeline folder.{hint}")
    data = _read_json(index)
    components, attributes = {}, {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value):
            components[key] = (value[0], value[1])
        else:
            attributes[key] = value
    return PipelineFolder(root, data.get("_class_name"), components, attributes)


def _component_problem(pf: PipelineFolder, name: str, variant: str | None) -> str | None:
    if name not in pf.components:
        return f"{name}: not listed in model_index.json"
    _, cls = pf.components[name]
    if cls is None:
        return f"{name}: set to null in model_index.json"
    sub = pf.root / name
    if not sub.is_dir():
        return f"{name} ({cls}): folder {name}/ is missing"
    kind = component_kind(cls)
    if kind == "scheduler":
        return None if (sub / "scheduler_config.json").is_file() else f"{name} ({cls}): {name}/scheduler_config.json is missing"
    if kind == "tokenizer":
        return None if any((sub / f).is_file() for f in _TOKENIZER_FILES) else (
            f"{name} ({cls}): {name}/ has none of {', '.join(_TOKENIZER_FILES)}")
    if kind == "processor":
        return None if (sub / "preprocessor_config.json").is_file() else f"{name} ({cls}): {name}/preprocessor_config.json is missing"
    if not (sub / "config.json").is_file():
        return f"{name} ({cls}): {name}/config.json is missing"
    try:
        open_safetensors(find_weights(sub, variant)).close()  # headers only: catches truncated files
    except PickleCheckpointError:
        return (f"{name} ({cls}): only pickle weights in {name}/, which jaxdiff refuses to open "
                "(pickle can run code); convert them with save_pretrained(..., safe_serialization=True)")
    except (FileNotFoundError, SafetensorsError) as e:
        return f"{name} ({cls}): {e}"
    return None


def missing_components(folder: str | os.PathLike, required: Iterable[str] | None = None, *,
                       variant: str | None = None) -> list[str]:
    """One line per required component that is absent or unusable (default: every non-null one)."""
    pf = read_model_index(folder)
    names = list(required) if required is not None else pf.present()
    return [p for p in (_component_problem(pf, n, variant) for n in names) if p is not None]


def require_components(folder: str | os.PathLike, required: Iterable[str] | None = None, *,
                       variant: str | None = None) -> PipelineFolder:
    """Parse the folder and raise one :class:`MissingComponentsError` naming every missing component."""
    problems = missing_components(folder, required, variant=variant)
    if problems:
        raise MissingComponentsError(Path(folder), problems)
    return read_model_index(folder)


def read_component_config(folder: str | os.PathLike, name: str) -> dict:
    """A component's config dict: ``scheduler_config.json`` for schedulers, else ``config.json``."""
    sub = Path(folder) / name
    for fname in ("scheduler_config.json", "config.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (sub / fname).is_file():
            return _read_json(sub / fname)
    raise FileNotFoundError(f"{sub} has no scheduler_config.json or config.json")


def _class_from_config(config: Mapping[str, Any], path: Path) -> str:
    """Reference class name written by diffusers (``_class_name``) or transformers (``architectures``)."""
    if isinstance(config.get("_class_name"), str):
        return config["_class_name"]
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return arch[0]
    raise ValueError(f"{path} names no model class (_class_name or architectures): pass class_name=")


def load_model_folder(path: str | os.PathLike, *, class_name: str | None = None, dtype: Any = jnp.float32,
                      variant: str | None = None, registry: Mapping[str, NetworkSpec] | None = None) -> nnx.Module:
    """Load one model folder (``config.json`` + safetensors weights) as a jaxdiff network."""
    path = Path(path)
    config = _read_json(path / "config.json")
    cls = network_class(class_name or _class_from_config(config, path / "config.json"), registry)
    with open_safetensors(find_weights(path, variant)) as tensors:
        return build_network(cls, config, tensors, dtype=dtype)


def load_component(folder: str | os.PathLike, name: str, *, dtype: Any = jnp.float32, variant: str | None = None,
                   registry: Mapping[str, NetworkSpec] | None = None) -> nnx.Module:
    """Load the network ``name`` (``"unet"``, ``"vae"``, ``"text_encoder"``...) of a pipeline folder.

    ``dtype`` (float32, bfloat16, float16) is the parameter and compute dtype; tensors are cast
    one at a time while filling.
    """
    pf = read_model_index(folder)
    problem = _component_problem(pf, name, variant)
    if problem is not None:
        raise MissingComponentsError(pf.root, [problem])
    _, cls_name = pf.components[name]
    if component_kind(cls_name) != "model":
        raise ValueError(f"{name} is a {component_kind(cls_name)} ({cls_name}), not a network: read it with read_component_config")
    return load_model_folder(pf.root / name, class_name=cls_name, dtype=dtype, variant=variant, registry=registry)


# ---------------------------------------------------------------------------------------------
# Single files.

_ORIGINAL_LAYOUT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


class PrefixView(Mapping[str, Any]):
    """The tensors of ``inner`` whose names start with ``prefix``, with the prefix removed."""

    def __init__(self, inner: Mapping[str, Any], prefix: str):
        self.inner, self.prefix = inner, prefix
        self._names = {k[len(prefix):]: k for k in inner.keys() if k.startswith(prefix)}
        inner_shapes = getattr(inner, "shapes", None)
        self.shapes = None if inner_shapes is None else {k: inner_shapes[v] for k, v in self._names.items()}

    def __getitem__(self, name: str) -> Any:
        return self.inner[self._names[name]]

    def release(self, name: str) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None and name in self._names:
            release(self._names[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_single_file(path: str | os.PathLike, family: str, config: Mapping[str, Any] | str | os.PathLike, *,
                     dtype: Any = jnp.float32, prefix: str = "",
                     registry: Mapping[str, NetworkSpec] | None = None) -> nnx.Module:
    """Load one network from a single ``.safetensors`` file in diffusers/transformers layout.

    ``family`` is a reference class name or short name (``"unet"``, ``"vae"``...), ``config`` the
    reference config as a dict, a ``config.json`` path or a folder holding one; ``prefix`` selects
    (and strips) a key prefix when the file holds more than this network.
    """
    path = Path(path)
    refuse_pickle(path)
    if isinstance(config, (str, os.PathLike)):
        cpath = Path(config)
        config = _read_json(cpath / "config.json" if cpath.is_dir() else cpath)
    cls = network_class(family, registry)
    with open_safetensors(path) as tensors:
        if not prefix and any(k.startswith(_ORIGINAL_LAYOUT_PREFIXES) for k in tensors.keys()):
            raise ValueError(
                f"{path} is an original (CompVis / Stability) single-file checkpoint holding several networks "
                "under their original names: load SD 1.x / 2.x files with StableDiffusion.from_single_file(path) "
                "or jaxdiff.convert.load_ldm_checkpoint(path) (or `jaxdiff sample --model path`), or pass prefix= "
                "for a diffusers-layout file."
            )
        view = PrefixView(tensors, prefix) if prefix else tensors
        if prefix and len(view) == 0:
            raise ValueError(f"no tensor in {path} starts with prefix {prefix!r}")
        return build_network(cls, config, view, dtype=dtype)
