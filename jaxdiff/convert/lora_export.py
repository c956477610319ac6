"""Write a jaxdiff LoRA (loaded, built or trained here) as the files diffusers, kohya and A1111 read.

The inverse of :func:`jaxdiff.lora.load_lora` for low-rank patches: each ``LowRank`` entry (``down`` (in, r)
or (kh, kw, in, r), ``up`` (r, out), ``alpha``) goes back to PyTorch names and layouts, ``down`` (r, in[, kh,
kw]) and ``up`` (out, r[, 1, 1]), in one safetensors file (never pickle):

- ``"diffusers"``: PEFT names ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.<module>`` for
  the text encoder, named as transformers 5 names ``CLIPTextModel``'s modules, without ``text_model.``) and
  diffusers' ``lora_adapter_metadata`` (each network's ``LoraConfig``: ``r``, ``lora_alpha``, and
  ``rank_pattern`` / ``alpha_pattern`` for the modules that differ), which
  ``StableDiffusionPipeline.load_lora_weights`` reads as its own;
- ``"kohya"``: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-d float32)
  and ``lora_te_...``, with sd-scripts' ``ss_network_*`` metadata.

Dense patches (LoHa, LoKr, full deltas) have no LoRA form and are refused.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff.convert.export import write_safetensors
from jaxdiff.convert.torch_layout import checkpoint_name, to_torch_layout
from jaxdiff.models import lora_formats as F

FORMATS = ("diffusers", "kohya")


def _modules(patch: Any) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(module, down, up, alpha) per low-rank entry, PyTorch names and layouts."""
    if patch.full:
        raise ValueError(f"the patch holds {len(patch.full)} dense deltas (LoHa, LoKr or full deltas), which the LoRA "
                         "file formats cannot store; save low-rank (LoRA) patches only")
    out = []
    for name, lr in sorted(patch.low_rank.items()):
        module = checkpoint_name(name)[: -len(".weight")]
        down = np.ascontiguousarray(to_torch_layout(np.asarray(lr.down, np.float32), "kernel"))
        up = np.ascontiguousarray(np.asarray(lr.up, np.float32).T)
        if down.ndim == 4:
            up = up[:, :, None, None]
        out.append((module, down, up, float(np.asarray(lr.alpha))))
    return out


def _peft_module(net: str, module: str) -> str:
    """The module name PEFT sees: transformers 5 names ``CLIPTextModel``'s modules without ``text_model.``."""
    return module[len("text_model."):] if net == "text_encoder" and module.startswith("text_model.") else module


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def lora_tensors(lora: Any, format: str = "diffusers") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of ``lora`` (a :class:`jaxdiff.lora.LoRA`) in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    tensors: dict[str, np.ndarray] = {}
    configs: dict[str, Any] = {}
    ranks, alphas = [], []
    for net, patch in lora.patches().items():
        entries = _modules(patch)
        if not entries:
            continue
        for module, down, up, alpha in entries:
            ranks.append(down.shape[0])
            alphas.append(alpha)
            if format == "diffusers":
                key = f"{F.PEFT_PREFIXES[net]}{_peft_module(net, module)}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
            else:
                key = F.KOHYA_PREFIXES[net] + module.replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
        if format == "diffusers":
            r = _most_common([d.shape[0] for _, d, _, _ in entries])
            a = _most_common([al for _, _, _, al in entries])
            pm = {m: _peft_module(net, m) for m, *_ in entries}
            configs[net] = {"r": int(r), "lora_alpha": a, "target_modules": sorted(pm.values()),
                            "rank_pattern": {pm[m]: int(d.shape[0]) for m, d, _, _ in entries if d.shape[0] != r},
                            "alpha_pattern": {pm[m]: al for m, _, _, al in entries if al != a},
                            "use_dora": False, "use_rslora": False, "lora_bias": False}
    if not tensors:
        raise ValueError("the LoRA has no low-rank entries to save")
    meta = {"format": "pt"}
    if format == "diffusers":
        meta[F.METADATA_KEY] = json.dumps({f"{net}.{k}": v for net, c in configs.items() for k, v in c.items()},
                                          sort_keys=True)
    else:
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(_most_common(ranks)),
                    ss_network_alpha=str(_most_common(alphas)),
                    ss_network_args=json.dumps({"conv_lora": any(v.ndim == 4 for v in tensors.values())}))
    return tensors, meta


def save_lora(path: str | os.PathLike, lora: Any, format: str = "diffusers",
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``lora`` to ``path`` (a ``.safetensors`` file; a folder gets diffusers'
    ``pytorch_lora_weights.safetensors``) in ``format`` (``"diffusers"`` or ``"kohya"``); ``metadata`` adds string
    entries to the file's metadata."""
    tensors, meta = lora_tensors(lora, format)
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "pytorch_lora_weights.safetensors"
    bad = [k for k, v in (metadata or {}).items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not for {bad}")
    return write_safetensors(path, tensors, {**meta, **dict(metadata or {})})
