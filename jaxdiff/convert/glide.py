"""openai/glide-text2im checkpoints (GLIDE, Nichol et al. 2022) <-> jaxdiff's :class:`~jaxdiff.models.glide.GlideUNet`.

openai's names (``base.pt`` / ``upsample.pt`` state dicts, here read from safetensors files holding the same
tensors) and jaxdiff's (the text encoder under ``text_encoder.`` with openai's own names; the U-Net under
``unet.`` with diffusers' ``UNet2DConditionModel`` names) differ as follows:

- U-Net: ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` -> ``conv_in``;
  ``input_blocks.k`` -> ``down_blocks.l.resnets.j`` / ``.attentions.j`` (sub-module 0 / 1), or
  ``down_blocks.l.downsamplers.0`` (a residual block with ``down=True``); ``middle_block.{0,1,2}`` ->
  ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``; ``output_blocks.k`` -> ``up_blocks.u.resnets.i``,
  ``.attentions.i`` and ``.upsamplers.0``; ``out.{0,2}`` -> ``conv_norm_out`` / ``conv_out``.
- residual blocks: ``in_layers.{0,2}`` -> ``norm1`` / ``conv1``, ``emb_layers.1`` -> ``time_emb_proj``,
  ``out_layers.{0,3}`` -> ``norm2`` / ``conv2``, ``skip_connection`` -> ``conv_shortcut``.
- attention: ``norm`` -> ``group_norm``; the fused 1x1 ``qkv`` convolution, laid out per head as
  ``[q_h, k_h, v_h]`` (openai's ``QKVAttention`` reshapes to ``(B*H, 3*ch, T)`` and splits), -> ``to_q``,
  ``to_k``, ``to_v``; ``encoder_kv`` (per head ``[k_h, v_h]``) -> ``add_k_proj`` / ``add_v_proj``;
  ``proj_out`` -> ``to_out.0``. 1x1 ``Conv1d`` kernels ``(out, in, 1)`` become ``Linear`` ``(out, in)``.
- text: ``token_embedding``, ``positional_embedding``, ``padding_embedding``, ``transformer.resblocks.N.*``,
  ``final_ln``, ``transformer_proj`` -> the same names under ``text_encoder.``.

:func:`load_glide` reads openai-named tensors (lazily, one at a time) into a model; :func:`to_openai` writes
a model's tensors back under openai's names and layouts, so a model saved by :func:`save_openai` round-trips
exactly.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.glide import GlideConfig

TEXT_PREFIX, UNET_PREFIX = "text_encoder.", "unet."
_TEXT_ROOTS = ("token_embedding.", "positional_embedding", "padding_embedding", "transformer.", "final_ln.",
               "transformer_proj.")
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_ATTN_PLAIN = {"norm": ("group_norm", ""), "proj_out": ("to_out.0", "squeeze")}
_QKV = ("to_q", "to_k", "to_v")
_ENC_KV = ("add_k_proj", "add_v_proj")


@dataclass(frozen=True)
class Source:
    """One jaxdiff tensor from one openai tensor: ``op`` is ``""`` (as is), ``"squeeze"`` (a 1x1 Conv1d kernel as a
    Linear one), or ``(part, parts)``: part ``part`` of ``parts`` per-head slices (q/k/v of ``qkv``: 3; k/v of
    ``encoder_kv``: 2) of a fused projection with ``heads`` heads, squeezed."""

    key: str
    op: Any = ""
    heads: int = 1


def _per_head(x: Any, part: int, parts: int, heads: int) -> Any:
    """Rows ``[h * parts * ch + part * ch, ... + ch)`` of every head h of a fused (parts * C, ...) tensor."""
    c = x.shape[0] // parts
    return x.reshape(heads, parts, c // heads, *x.shape[1:])[:, part].reshape(c, *x.shape[1:])


def _apply(src: Source, x: np.ndarray) -> np.ndarray:
    if src.op == "":
        return x
    if x.ndim == 3:  # Conv1d kernel (out, in, 1) -> Linear (out, in)
        x = x[..., 0]
    return x if src.op == "squeeze" else _per_head(x, src.op[0], src.op[1], src.heads)


def _apply_shape(src: Source, shape: tuple[int, ...]) -> tuple[int, ...]:
    if src.op == "":
        return tuple(shape)
    shape = tuple(shape[:2]) if len(shape) == 3 else tuple(shape)
    return shape if src.op == "squeeze" else (shape[0] // src.op[1], *shape[1:])


# ---- the block index tables ------------------------------------------------------------------

def _block_tables(cfg: GlideConfig) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """openai's ``input_blocks.k`` / ``output_blocks.k`` -> the diffusers module of each of its sub-modules."""
    mult, att, n = cfg.mult, cfg.attends(), cfg.num_res_blocks
    inputs: dict[int, list[str]] = {0: ["conv_in"]}
    k = 1
    for level in range(len(mult)):
        for j in range(n):
            attn = [f"down_blocks.{level}.attentions.{j}"] if att[level] else []
            inputs[k] = [f"down_blocks.{level}.resnets.{j}", *attn]
            k += 1
        if level != len(mult) - 1:
            inputs[k] = [f"down_blocks.{level}.downsamplers.0"]
            k += 1
    outputs: dict[int, list[str]] = {}
    k = 0
    for u, level in enumerate(reversed(range(len(mult)))):
        for i in range(n + 1):
            subs = [f"up_blocks.{u}.resnets.{i}"] + ([f"up_blocks.{u}.attentions.{i}"] if att[level] else [])
            if level and i == n:
                subs.append(f"up_blocks.{u}.upsamplers.0")
            outputs[k] = subs
            k += 1
    return inputs, outputs


def _heads(cfg: GlideConfig, module: str) -> int:
    """Heads of the attention layer ``module`` (diffusers name): its channels / ``num_head_channels``."""
    parts = module.split(".")
    if parts[0] == "mid_block":
        ch = cfg.num_channels * cfg.mult[-1]
    else:
        level = int(parts[1]) if parts[0] == "down_blocks" else len(cfg.mult) - 1 - int(parts[1])
        ch = cfg.num_channels * cfg.mult[level]
    return ch // cfg.num_head_channels


def _module_params(openai_module: str, module: str, key_rest: str, cfg: GlideConfig) -> list[tuple[str, Source]]:
    """The jaxdiff tensors of one openai tensor ``openai_module + "." + key_rest`` of a U-Net sub-module."""
    key = f"{openai_module}.{key_rest}"
    if module == "conv_in":
        return [(f"conv_in.{key_rest}", Source(key))]
    head, leaf = key_rest.rsplit(".", 1)
    if ".attentions." in module or module == "mid_block.attentions.0":
        if head in _ATTN_PLAIN:
            name, op = _ATTN_PLAIN[head]
            return [(f"{module}.{name}.{leaf}", Source(key, op))]
        h = _heads(cfg, module)
        if head == "qkv":
            return [(f"{module}.{n}.{leaf}", Source(key, (i, 3), h)) for i, n in enumerate(_QKV)]
        if head == "encoder_kv":
            return [(f"{module}.{n}.{leaf}", Source(key, (i, 2), h)) for i, n in enumerate(_ENC_KV)]
        raise KeyError(key)
    if head not in _RESNET:
        raise KeyError(key)
    return [(f"{module}.{_RESNET[head]}.{leaf}", Source(key))]


def unet_name(key: str, cfg: GlideConfig) -> list[tuple[str, Source]]:
    """The jaxdiff (diffusers-named, without the ``unet.`` prefix) tensors one openai U-Net tensor fills."""
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "out.0": "conv_norm_out", "out.2": "conv_out"}
    head, leaf = key.rsplit(".", 1)
    if head in top:
        return [(f"{top[head]}.{leaf}", Source(key))]
    parts = key.split(".")
    inputs, outputs = _block_tables(cfg)
    if parts[0] in ("input_blocks", "output_blocks"):
        table = inputs if parts[0] == "input_blocks" else outputs
        subs = table.get(int(parts[1]))
        if subs is None or int(parts[2]) >= len(subs):
            raise KeyError(key)
        return _module_params(".".join(parts[:3]), subs[int(parts[2])], ".".join(parts[3:]), cfg)
    if parts[0] == "middle_block":
        module = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}.get(parts[1])
        if module is None:
            raise KeyError(key)
        return _module_params(".".join(parts[:2]), module, ".".join(parts[2:]), cfg)
    raise KeyError(key)


def is_text_key(key: str) -> bool:
    return key.startswith(_TEXT_ROOTS)


def plan(keys: Any, cfg: GlideConfig) -> dict[str, Source]:
    """jaxdiff name -> :class:`Source` for every openai key (unknown keys raise, naming them)."""
    out: dict[str, Source] = {}
    unknown = []
    for key in keys:
        if is_text_key(key):
            out[TEXT_PREFIX + key] = Source(key)
            continue
        try:
            for name, src in unet_name(key, cfg):
                out[UNET_PREFIX + name] = src
        except (KeyError, ValueError, IndexError):
            unknown.append(key)
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        raise ValueError(f"tensors that are not part of a GLIDE model with this config: {sorted(unknown)[:10]}{more}; "
                         "check the config (GlideConfig / GlideConfig.upsampler())")
    return out


class OpenAIView(Mapping[str, Any]):
    """jaxdiff names over openai-named tensors (sliced, squeezed on access; one tensor at a time)."""

    def __init__(self, inner: Mapping[str, Any], cfg: GlideConfig):
        self.inner, self.plan = inner, plan(list(inner.keys()), cfg)
        shapes = getattr(inner, "shapes", None)
        self.shapes = None if shapes is None else {k: _apply_shape(s, shapes[s.key]) for k, s in self.plan.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        src = self.plan[name]
        return _apply(src, np.asarray(self.inner[src.key]))

    def release(self, name: str) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None and name in self.plan:
            release(self.plan[name].key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


# ---- loading and saving ----------------------------------------------------------------------

def abstract_glide(cfg: GlideConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Any:
    """The model's shapes only (``nnx.eval_shape``): parameter counts and shapes of full-size configs for free."""
    from flax import nnx

    from jaxdiff.convert.torch_layout import abstract
    from jaxdiff.models.glide import GlideUNet

    return abstract(lambda: GlideUNet(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def load_glide(source: str | os.PathLike | Mapping[str, Any], cfg: GlideConfig | None = None, *,
               dtype: Any = jnp.float32) -> Any:
    """A :class:`~jaxdiff.models.glide.GlideUNet` from openai-named tensors: a safetensors file or a mapping.

    ``cfg`` defaults to the released base model (:class:`GlideConfig`); the upsampler is ``GlideConfig.upsampler()``.
    """
    from jaxdiff.convert.safetensors_io import open_safetensors, refuse_pickle
    from jaxdiff.convert.torch_layout import load_torch_tensors

    cfg = cfg or GlideConfig()
    model = abstract_glide(cfg, dtype=dtype, param_dtype=dtype)
    if isinstance(source, Mapping):
        return load_torch_tensors(model, OpenAIView(source, cfg), dtype=dtype)
    refuse_pickle(source)
    with open_safetensors(source) as tensors:
        return load_torch_tensors(model, OpenAIView(tensors, cfg), dtype=dtype)


def _fuse(parts: list[Any], heads: int) -> Any:
    """Inverse of :func:`_per_head`: interleave the parts head by head into one (parts * C, ...) tensor."""
    c = parts[0].shape[0]
    stacked = jnp.stack([p.reshape(heads, c // heads, *p.shape[1:]) for p in parts], axis=1)
    return stacked.reshape(len(parts) * c, *parts[0].shape[1:])


def to_openai(tensors: Mapping[str, Any], cfg: GlideConfig, openai_keys: Any = None) -> dict[str, Any]:
    """jaxdiff-named PyTorch-layout tensors (:func:`jaxdiff.convert.torch_state_dict` of a ``GlideUNet``) ->
    openai's names and layouts (Conv1d kernels ``(out, in, 1)``, fused per-head ``qkv`` / ``encoder_kv``).

    Works under ``jax.eval_shape`` (shapes of the full-size models). ``openai_keys`` defaults to the keys
    implied by the tensors themselves.
    """
    if openai_keys is None:
        openai_keys = openai_key_list(tensors, cfg)
    pl = plan(openai_keys, cfg)
    groups: dict[str, list[tuple[str, Source]]] = {}
    for name, src in pl.items():
        groups.setdefault(src.key, []).append((name, src))
    out = {}
    for key, members in groups.items():
        (name0, src0) = members[0]
        if src0.op == "":
            out[key] = tensors[name0]
        elif src0.op == "squeeze":
            x = tensors[name0]
            out[key] = x[..., None] if x.ndim == 2 else x
        else:
            ordered = [tensors[n] for n, _ in sorted(members, key=lambda m: m[1].op[0])]
            x = _fuse(ordered, src0.heads)
            out[key] = x[..., None] if x.ndim == 2 else x
    return out


def openai_key_list(tensors: Mapping[str, Any], cfg: GlideConfig) -> list[str]:
    """The openai keys whose jaxdiff counterparts are all in ``tensors`` (the inverse of :func:`plan`'s naming)."""
    names = set(tensors)
    inv = _inverse_names(cfg, names)
    return sorted(inv)


def _inverse_names(cfg: GlideConfig, names: set[str]) -> set[str]:
    out = set()
    inputs, outputs = _block_tables(cfg)
    module_to_openai: dict[str, str] = {}
    for k, subs in inputs.items():
        for s, m in enumerate(subs):
            module_to_openai[m] = f"input_blocks.{k}.{s}"
    for k, subs in outputs.items():
        for s, m in enumerate(subs):
            module_to_openai[m] = f"output_blocks.{k}.{s}"
    module_to_openai.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                             "mid_block.resnets.1": "middle_block.2"})
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_norm_out": "out.0", "conv_out": "out.2"}
    res_inv = {v: k for k, v in _RESNET.items()}
    attn_inv = {"group_norm": "norm", "to_out.0": "proj_out", **{n: "qkv" for n in _QKV},
                **{n: "encoder_kv" for n in _ENC_KV}}
    for name in names:
        if name.startswith(TEXT_PREFIX):
            out.add(name[len(TEXT_PREFIX):])
            continue
        if not name.startswith(UNET_PREFIX):
            raise ValueError(f"{name!r} is not a GlideUNet tensor (text_encoder.* or unet.*)")
        rest = name[len(UNET_PREFIX):]
        head, leaf = rest.rsplit(".", 1)
        if head in top:
            out.add(f"{top[head]}.{leaf}")
            continue
        if head.startswith("conv_in"):
            out.add(f"input_blocks.0.0.{leaf}")
            continue
        for module, okey in module_to_openai.items():
            if head.startswith(module + "."):
                sub = head[len(module) + 1:]
                table = attn_inv if ".attentions." in module else res_inv
                if sub not in table:
                    raise ValueError(f"{name!r} has no openai counterpart")
                out.add(f"{okey}.{table[sub]}.{leaf}")
                break
        else:
            raise ValueError(f"{name!r} has no openai counterpart")
    return out


def openai_state_dict(model: Any) -> dict[str, np.ndarray]:
    """A ``GlideUNet``'s tensors under openai's names and layouts (host numpy, float32 as stored)."""
    from jaxdiff.convert.export import torch_state_dict

    return {k: np.asarray(v) for k, v in to_openai(torch_state_dict(model), model.config).items()}


def openai_shapes(cfg: GlideConfig, model: Any = None) -> dict[str, tuple[int, ...]]:
    """openai key -> tensor shape of a model with this config, from the abstract model (nothing allocated;
    ``model``: one already built, e.g. by :func:`abstract_glide`)."""
    from flax import nnx

    from jaxdiff.convert.torch_layout import checkpoint_name, parameter_kind

    model = abstract_glide(cfg) if model is None else model
    torch_shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        shape = _torch_kernel_shape(v.shape) if parameter_kind(path) == "kernel" else tuple(v.shape)
        torch_shapes[checkpoint_name(path)] = jax.ShapeDtypeStruct(shape, v.dtype)
    shaped = jax.eval_shape(lambda t: to_openai(t, cfg), torch_shapes)
    return {k: tuple(v.shape) for k, v in shaped.items()}


def _torch_kernel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 2:
        return (shape[1], shape[0])
    return (shape[-1], shape[-2], *shape[:-2])


def save_openai(model: Any, path: str | os.PathLike) -> None:
    """Write a ``GlideUNet`` as a safetensors file of openai-named tensors (what :func:`load_glide` reads)."""
    from jaxdiff.convert.export import write_safetensors

    write_safetensors(path, openai_state_dict(model), {"format": "pt", "layout": "openai/glide-text2im"})
