"""LoRA for Stable Diffusion (Hu et al. 2021): the files people share, several adapters, run-time scales, fuse.

A :class:`LoRA` holds one adapter's weight patches (:class:`jaxdiff.models.patches.Patch`) for the U-Net and
the text encoder, converted once from any format :mod:`jaxdiff.models.lora_formats` reads (diffusers / PEFT,
kohya, LyCORIS LoHa and LoKr)::

    from jaxdiff import lora
    style, detail = lora.load_lora("style.safetensors", sd), lora.load_lora("detail.safetensors", sd)
    sd_l, net = lora.apply(sd, [style, detail], [0.8, -0.5])
    images = sd_l(prompts, network_transform=net)

How the patches reach the compiled SD program:

- **U-Net**: ``net`` is a network transform (:func:`jaxdiff.models.patches.patch_weights`) patching the U-Net
  at every call inside guidance, its scales traced leaves;
- **text encoder**: the recipe encodes the prompt inside its program with ``SDModels.encode_text``, so the
  returned recipe's ``models.text_encoder`` is a :class:`jaxdiff.models.patches.PatchedModel` (the same
  weights, patched at call time with traced scales), a drop-in for the ``PureModel`` it replaces.

So new scales (0: an adapter off) are a new :func:`apply` on the *original* recipe and reuse the compiled
program (the number of adapters, and which networks they patch, shape it). A scale may be an array (B,),
one per prompt of the call: image ``i`` runs both networks at entry ``i`` (the U-Net's through
:class:`jaxdiff.conditioning.PerImage`). :func:`fuse` folds adapters into the weights (no per-call cost) and
:func:`unfuse` restores the exact original arrays. :func:`save_lora` (:mod:`jaxdiff.convert.lora_export`) writes a
:class:`LoRA` in the diffusers or the kohya format; :mod:`jaxdiff.train.lora` trains one.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff import conditioning
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.convert.lora_export import save_lora
from jaxdiff.models import lora_formats as F
from jaxdiff.models import patches as P
from jaxdiff.models._pure import PureModel

__all__ = ["LoRA", "Fused", "apply", "fuse", "load_lora", "read_lora_file", "save_lora", "unfuse"]
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


@pytree_dataclass
class LoRA:
    """One adapter: its patches of the U-Net and of the text encoder (either may be None)."""

    unet: P.Patch | None = None
    text_encoder: P.Patch | None = None
    name: str = static_field(default="lora")

    def __post_init__(self) -> None:
        if self.unet is None and self.text_encoder is None:
            raise ValueError("a LoRA needs a patch of the U-Net or of the text encoder (both are None)")

    def patches(self) -> dict[str, P.Patch]:
        """{network: patch} of the networks this adapter patches."""
        return {n: p for n in F.NETWORKS if (p := getattr(self, n)) is not None}


def _base(model: Any) -> PureModel:
    return model.base if isinstance(model, P.PatchedModel) else model


def _models(target: Any) -> dict[str, PureModel]:
    """{network: PureModel} of a StableDiffusion, its SDModels or a dict (adapters already applied: their base)."""
    if isinstance(target, Mapping):
        return {k: _base(v) for k, v in target.items() if k in F.NETWORKS}
    models = getattr(target, "models", target)
    return {n: _base(getattr(models, n)) for n in F.NETWORKS if getattr(models, n, None) is not None}


def _rename(model: PureModel) -> Any:
    cls = P._model_type(model)
    return getattr(cls, "rename_torch_key", None)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA ``.safetensors`` file, or of the one in a diffusers folder
    (``pytorch_lora_weights.safetensors``). Pickle files (``.pt``, ``.bin``, ``.ckpt``) are refused."""
    from jaxdiff.convert.safetensors_io import SafetensorsFile, refuse_pickle

    path = Path(path)
    if path.is_dir():
        files = [path / DIFFUSERS_FILE] if (path / DIFFUSERS_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path} holds {len(files)} .safetensors files; give the LoRA file itself")
        path = files[0]
    refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    with SafetensorsFile(path) as f:
        return {k: np.array(f[k]) for k in f}, dict(f.metadata)


def load_lora(source: Any, target: Any, *, name: str | None = None,
              metadata: Mapping[str, str] | None = None) -> LoRA:
    """A :class:`LoRA` from a file (``.safetensors`` or a diffusers LoRA folder) or a tensor dict, for ``target``
    (a ``StableDiffusion``, its ``models`` or ``{"unet": ..., "text_encoder": ...}``); the format is detected
    per key (:mod:`jaxdiff.models.lora_formats`). ``metadata``: the safetensors metadata of a tensor dict (a
    file's own is read). Keys without a network prefix are the U-Net's (``unet.save_attn_procs`` files).

    Raises :class:`jaxdiff.models.patches.PatchMismatchError` listing every key of either network that does not
    fit (unknown layout, no such layer, wrong shape, another model family), before anything is built."""
    if isinstance(source, (str, os.PathLike)):
        tensors, file_meta = read_lora_file(source)
        name = name or Path(source).stem
        metadata = {**file_meta, **(metadata or {})}
    else:
        tensors = dict(source)
    if not tensors:
        raise P.PatchMismatchError("the LoRA holds no tensors")
    prefixes, problems = F.network_prefixes(tensors)
    if not prefixes and all(F.split_role(k) or F.unsupported(k) for k in tensors):
        prefixes, problems = {"unet": [""]}, []
    models = _models(target)
    configs = F.peft_configs(metadata)
    out: dict[str, P.Patch] = {}
    for net, found in prefixes.items():
        if len(found) > 1:
            problems.append(f"keys of the {net} under several prefixes ({', '.join(found)}): give one LoRA per file")
            continue
        if net not in models:
            problems.append(f"{found[0]}...: the target has no {net}")
            continue
        try:
            alpha = F.alpha_rule(configs.get(net))
        except ValueError as e:
            problems.append(f"{net}: {e}")
            continue
        out[net], found_problems = P.lora_problems(tensors, models[net], prefix=found[0], alpha=alpha,
                                                   rename=_rename(models[net]))
        problems += found_problems
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise P.PatchMismatchError(f"the LoRA does not fit this model ({len(problems)} problem(s)): {shown}")
    return LoRA(out.get("unet"), out.get("text_encoder"), name or "lora")


def _scales(adapters: Sequence[LoRA], scales: Any) -> list[Any]:
    adapters = list(adapters)
    if scales is None:
        scales = [1.0] * len(adapters)
    elif np.ndim(scales) == 0 and not isinstance(scales, (list, tuple)):
        scales = [scales] * len(adapters)
    scales = list(scales)
    if len(scales) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(scales)} scales: give one scale per adapter")
    for a in adapters:
        if not isinstance(a, LoRA):
            raise TypeError(f"expected LoRA adapters (jaxdiff.lora.load_lora), got {type(a).__name__}")
    out = []
    for s in scales:
        s = jnp.asarray(s, jnp.float32)
        if s.ndim > 1:
            raise ValueError(f"an adapter scale is a number or one per prompt (B,), got shape {s.shape}")
        out.append(s)
    return out


def apply(sd: Any, adapters: Sequence[LoRA], scales: Any = None) -> tuple[Any, Any]:
    """(the recipe with the adapters' text-encoder patches, the U-Net network transform or None).

    ``scales``: one per adapter (default 1; a single number for all), each a number or an array (B,) of one
    scale per prompt of the call. Applies to the *base* networks: adapters applied before are replaced, so
    calling again with new scales (0: off) switches them at run time and reuses the compiled program.
    Generate with ``sd_l(prompts, network_transform=conditioning.chain(net, other_transforms))``."""
    adapters = list(adapters)
    scales = _scales(adapters, scales)
    models = sd.models
    base_te, base_unet = _base(models.text_encoder), _base(models.unet)
    te = [(a.text_encoder, s) for a, s in zip(adapters, scales) if a.text_encoder is not None]
    un = [(a.unet, s) for a, s in zip(adapters, scales) if a.unet is not None]
    text_encoder = P.PatchedModel(base_te, *map(tuple, zip(*te))) if te else base_te
    net = None
    if un:
        per = tuple(conditioning.PerImage(s) if s.ndim else s for _, s in un)
        net = conditioning.Transform(P.PatchWeights, {"patches": tuple(p for p, _ in un), "scales": per},
                                     (("model", P._model_type(base_unet)),))
    new = dataclasses.replace(models, text_encoder=text_encoder, unet=base_unet)
    return dataclasses.replace(sd, models=new), net


@dataclasses.dataclass(frozen=True)
class Fused:
    """What :func:`unfuse` needs: per network, the original arrays of the parameters :func:`fuse` changed."""

    originals: dict


def fuse(sd: Any, adapters: Sequence[LoRA], scales: Any = None) -> tuple[Any, Fused]:
    """(the recipe with ``W + sum_i scale_i * delta_i`` folded into its weights, what :func:`unfuse` needs).

    diffusers' ``fuse_lora``: the fused recipe runs the plain program (no per-call patching). Scales are
    numbers here (a per-prompt scale needs :func:`apply`). Fuses into the base networks: adapters given to
    :func:`apply` before are not part of the result."""
    adapters = list(adapters)
    scales = _scales(adapters, scales)
    if any(s.ndim for s in scales):
        raise ValueError("fuse takes one number per adapter; per-prompt scales need lora.apply")
    models = sd.models
    changed, originals = {}, {}
    for net in F.NETWORKS:
        model = _base(getattr(models, net))
        kept: dict = {}
        for a, s in zip(adapters, scales):
            patch = getattr(a, net)
            if patch is not None:
                model, orig = P.fuse(model, patch, s)
                for k, v in orig.items():
                    kept.setdefault(k, v)  # the first value is the original; later ones were fused already
        changed[net], originals[net] = model, kept
    return dataclasses.replace(sd, models=dataclasses.replace(models, **changed)), Fused(originals)


def unfuse(sd: Any, fused: Fused) -> Any:
    """The recipe with the arrays :func:`fuse` changed set back: bit-exact the weights before fusing."""
    models = sd.models
    changed = {net: P.unfuse(_base(getattr(models, net)), orig) for net, orig in fused.originals.items()}
    return dataclasses.replace(sd, models=dataclasses.replace(models, **changed))
