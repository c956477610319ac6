"""The LoRA file formats people share: which network a key belongs to, which layer it targets, and the maths.

One file may hold the U-Net's and the text encoder's adapters, in one of these layouts (PyTorch names and
layouts throughout; :func:`jaxdiff.models.patches.lora` converts them to jaxdiff's):

- **diffusers / PEFT**: ``unet.<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r) and
  ``text_encoder.<module>...``; the scale ``lora_alpha / r`` comes from the safetensors metadata
  (``lora_adapter_metadata``: the ``LoraConfig`` of each network, ``unet.lora_alpha``, ``unet.alpha_pattern``,
  ``unet.use_rslora``...), else ``alpha = r`` as diffusers assumes. Older diffusers files name the pairs
  ``<module>.lora.down.weight`` / ``.lora.up.weight``, ``<module>.lora_linear_layer.down.weight`` and, for the
  attention processors, ``<attn>.processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0``; in the
  CLIP text encoder ``self_attn.to_q_lora`` is ``q_proj``).
- **kohya** (sd-scripts, A1111): ``lora_unet_<module with _ for .>`` and ``lora_te_...`` (``lora_te1_``: the
  first text encoder, the only one SD 1.x / 2.x have), ``.lora_down.weight`` / ``.lora_up.weight`` and a scalar
  ``.alpha``; conv layers use the LoRA-conv form (a k x k ``down`` conv, a 1x1 ``up`` conv).
- **LyCORIS LoHa** (Hyeon-Woo et al. 2022): ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*k*k),
  ``hada_w2_a``, ``hada_w2_b``: ``delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r``; with Tucker factors
  ``hada_t1`` / ``hada_t2`` (r, r, k, k) each product is ``einsum('ijkl,ip,jr->prkl', t, wa, wb)``.
- **LyCORIS LoKr** (Yeh et al. 2023): ``lokr_w1`` (or ``lokr_w1_a @ lokr_w1_b``) and ``lokr_w2`` (or
  ``lokr_w2_a @ lokr_w2_b``, or the Tucker form with ``lokr_t2``): ``delta = kron(w1, w2) * alpha / r`` where
  ``r`` is the rank of the factored matrix; when neither is factored the scale is 1, as LyCORIS sets it.

LoHa and LoKr deltas are dense (a Hadamard or Kronecker product has full rank), so they become full-delta
entries of the same :class:`~jaxdiff.models.patches.Patch`, scaled like a LoRA at run time.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

NETWORKS = ("unet", "text_encoder")
# file prefix -> network; "kohya" prefixes use underscored module names
PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "lora_unet_": "unet", "lora_te_": "text_encoder",
            "lora_te1_": "text_encoder"}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PEFT_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder."}
REFUSED_PREFIXES = {"lora_te2_": "SDXL's second text encoder", "text_encoder_2.": "SDXL's second text encoder",
                    "lora_transformer_": "a DiT transformer (Flux, SD3)", "transformer.": "a DiT transformer"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (the LoraConfig of each network)

# (key suffix, role); a key ends with "." + suffix
ROLES = (
    ("lora_A.weight", "down"), ("lora_B.weight", "up"),
    ("lora_down.weight", "down"), ("lora_up.weight", "up"),
    ("lora_linear_layer.down.weight", "down"), ("lora_linear_layer.up.weight", "up"),
    ("lora.down.weight", "down"), ("lora.up.weight", "up"),
    ("alpha", "alpha"),
    ("hada_w1_a", "hada_w1_a"), ("hada_w1_b", "hada_w1_b"), ("hada_w2_a", "hada_w2_a"), ("hada_w2_b", "hada_w2_b"),
    ("hada_t1", "hada_t1"), ("hada_t2", "hada_t2"),
    ("lokr_w1", "lokr_w1"), ("lokr_w1_a", "lokr_w1_a"), ("lokr_w1_b", "lokr_w1_b"),
    ("lokr_w2", "lokr_w2"), ("lokr_w2_a", "lokr_w2_a"), ("lokr_w2_b", "lokr_w2_b"), ("lokr_t2", "lokr_t2"),
)
UNSUPPORTED = {"dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
               "lora_B.bias": "LoRA with a bias", "diff_b": "a bias delta", "diff": "a full weight delta"}
_LEGACY_ATTN = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_CLIP_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj"}


_PROCESSOR = re.compile(r"^(.*\.to_(?:q|k|v|out)_lora)\.(down|up)\.weight$")


def split_role(key: str) -> tuple[str, str] | None:
    """``"a.b.lora_A.weight"`` -> ``("a.b", "down")``; None for a key of no known layout."""
    legacy = _PROCESSOR.match(key)  # diffusers' attention processors: attn1.processor.to_q_lora.down.weight
    if legacy:
        return legacy.group(1), legacy.group(2)
    for suffix, role in ROLES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return None


def unsupported(key: str) -> str | None:
    """What a key of a known but unsupported kind holds (DoRA magnitudes, biases), or None."""
    for suffix, what in UNSUPPORTED.items():
        if key.endswith("." + suffix):
            return what
    return None


def normalize_module(module: str) -> str:
    """The layer an older diffusers name targets: ``attn1.processor.to_q_lora`` -> ``attn1.to_q``, in CLIP's
    ``self_attn`` -> ``q_proj``; other names unchanged."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[-2] == "processor" and parts[-1] in _LEGACY_ATTN:
        parts = parts[:-2] + [_LEGACY_ATTN[parts[-1]]]
    elif parts[-1] in _LEGACY_ATTN:
        parts = parts[:-1] + [_LEGACY_ATTN[parts[-1]]]
    out = ".".join(parts)
    if ".self_attn." in out:
        for old, new in _CLIP_ATTN.items():
            if out.endswith(".self_attn." + old):
                out = out[: -len(old)] + new
    return out


def network_prefixes(keys: Any) -> tuple[dict[str, list[str]], list[str]]:
    """({network: [prefixes present]}, problems): the prefixes of a LoRA file's keys, refused ones named."""
    found: dict[str, list[str]] = {}
    problems = []
    for key in keys:
        for prefix, what in REFUSED_PREFIXES.items():
            if key.startswith(prefix):
                problems.append(f"{key}: a LoRA for {what}, not for Stable Diffusion 1.x / 2.x")
                break
        else:
            for prefix, net in PREFIXES.items():
                if key.startswith(prefix):
                    if prefix not in found.setdefault(net, []):
                        found[net].append(prefix)
                    break
            else:
                problems.append(f"{key}: no network prefix (expected unet. / text_encoder. / lora_unet_ / lora_te_)")
    return found, problems


def group(tensors: Mapping[str, Any]) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """({module: {role: array}}, problems) for one network's keys (prefix already stripped)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, value in tensors.items():
        what = unsupported(key)
        if what is not None:
            problems.append(f"{key}: {what} is not supported")
            continue
        split = split_role(key)
        if split is None:
            problems.append(f"{key}: not a LoRA tensor of a known layout (LoRA, LoHa, LoKr)")
            continue
        module, role = split
        modules.setdefault(normalize_module(module), {})[role] = np.asarray(value)
    return modules, problems


def kind(parts: Mapping[str, Any]) -> str:
    """``"lora"``, ``"loha"`` or ``"lokr"`` from the roles one module holds."""
    if any(r.startswith("hada_") for r in parts):
        return "loha"
    if any(r.startswith("lokr_") for r in parts):
        return "lokr"
    return "lora"


# ---- LyCORIS maths (PyTorch layout, float64 on the host) -----------------------------------------------------


def _tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """The (out, in, k, k) kernel of a Tucker factorisation: ``einsum('ijkl,ip,jr->prkl', t, wa, wb)``."""
    return np.einsum("ijkl,ip,jr->prkl", t, wa, wb)


def _f64(parts: Mapping[str, Any], role: str) -> np.ndarray:
    return np.asarray(parts[role], np.float64)


def _need(parts: Mapping[str, Any], roles: tuple[str, ...], what: str) -> None:
    missing = [r for r in roles if r not in parts]
    if missing:
        raise ValueError(f"{what} misses {', '.join(missing)}")


def loha_delta(parts: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """LoHa: ``(w1a @ w1b) * (w2a @ w2b) * alpha / r`` shaped as the target weight (PyTorch layout)."""
    _need(parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
    rank = parts["hada_w1_b"].shape[0]
    products = []
    for i in ("1", "2"):
        wa, wb = _f64(parts, f"hada_w{i}_a"), _f64(parts, f"hada_w{i}_b")
        products.append(_tucker(_f64(parts, f"hada_t{i}"), wa, wb) if f"hada_t{i}" in parts else wa @ wb)
    delta = products[0] * products[1]
    alpha = float(np.asarray(parts["alpha"])) if "alpha" in parts else rank
    return _shaped(delta * (alpha / rank), shape, "LoHa")


def _lokr_factor(parts: Mapping[str, Any], i: str) -> tuple[np.ndarray, int | None]:
    if f"lokr_w{i}" in parts:
        return _f64(parts, f"lokr_w{i}"), None
    _need(parts, (f"lokr_w{i}_a", f"lokr_w{i}_b"), f"LoKr factor w{i}")
    wa, wb = _f64(parts, f"lokr_w{i}_a"), _f64(parts, f"lokr_w{i}_b")
    if f"lokr_t{i}" in parts:
        return _tucker(_f64(parts, f"lokr_t{i}"), wa, wb), wb.shape[0]
    return wa @ wb, wb.shape[0]


def lokr_delta(parts: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """LoKr: ``kron(w1, w2) * alpha / r`` (scale 1 when neither factor is low-rank) shaped as the target weight."""
    w1, r1 = _lokr_factor(parts, "1")
    w2, r2 = _lokr_factor(parts, "2")
    rank = r1 if r1 is not None else r2
    scale = 1.0
    if rank is not None:
        scale = (float(np.asarray(parts["alpha"])) if "alpha" in parts else rank) / rank
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return _shaped(np.kron(w1, w2) * scale, shape, "LoKr")


def _shaped(delta: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if delta.size != math.prod(shape):
        raise ValueError(f"the {what} delta has {tuple(delta.shape)} ({delta.size} values), the layer {shape}")
    return delta.reshape(shape).astype(np.float32)


# ---- alphas from metadata -------------------------------------------------------------------------------------


def peft_configs(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """{network: LoraConfig dict} from diffusers' ``lora_adapter_metadata`` (empty when there is none)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    flat = json.loads(raw)
    out: dict[str, dict] = {}
    for key, value in flat.items():
        net, _, field = key.partition(".")
        if field:
            out.setdefault(net, {})[field] = value
    return out


def pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` with ``module`` matching
    ``(.*\\.)?(k)$``, else None."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def alpha_rule(config: Mapping[str, Any] | None) -> Callable[[str, int], float] | None:
    """``alpha(module, rank)`` as PEFT scales a module of this ``LoraConfig`` dict (``alpha / r``, rsLoRA's
    ``alpha / sqrt(r)`` returned as the equivalent ``alpha * sqrt(r)``), or None without a config."""
    if not config:
        return None
    if config.get("use_dora"):
        raise ValueError("this LoRA uses DoRA (use_dora in its metadata), which jaxdiff does not support")
    default = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def alpha(module: str, rank: int) -> float:
        a = pattern_value(patterns, module)
        a = float(a if a is not None else default if default is not None else rank)
        return a * math.sqrt(rank) if rslora else a

    return alpha
