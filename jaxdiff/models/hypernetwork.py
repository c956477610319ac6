"""Hypernetworks of the AUTOMATIC1111 / NovelAI kind: small MLPs on the context of the U-Net's attention.

The format (written here from its description): a ``.pt`` dict with, for each context width ``w`` (an int key:
320, 640, 768, 1280 ...), a pair of state dicts ``[keys, values]``, each a torch ``Sequential`` of
``linear.{i}.weight / .bias`` entries. ``layer_structure`` (e.g. ``[1, 2, 1]``) multiplies ``w`` to give the
widths of its linear layers; after each linear comes the activation ``activation_func`` (``linear`` = none;
not after the last one unless ``activate_output``), a layer norm when ``is_layer_norm``, and dropout
(``use_dropout``, ``dropout_structure``, ``last_layer_dropout``: training only, absent at inference). The
parameter-free modules (activation, dropout) take Sequential indices too, so a weight's index says where the
activation sits relative to the layer norm; the loader reads that from the indices. Old NovelAI files hold
``linear1`` / ``linear2`` (a ``[1, 2, 1]`` linear MLP).

An attention layer whose context has width ``w`` reads keys from ``c + s * f_k(c)`` and values from
``c + s * f_v(c)`` (``s`` the strength), with ``c`` its context: the text for cross-attention and the
normalised hidden states for self-attention, as in that project (its modules are keyed by width, so a 320
module acts on the 320-wide self-attention layers). Several hypernetworks chain, each transforming the
previous one's keys and values. Here that is an :class:`jaxdiff.models.attention_control.Hypernetwork`
control at every site (:func:`hypernetwork_control`), used as a network transform (:func:`hypernetworks`);
the strength is a traced leaf, so a new strength compiles nothing, and strength 0 gives the plain model.

Files: ``.pt`` through :func:`jaxdiff.convert.pt_reader.read_pt` (no pickled code runs), and safetensors with
flat names mirroring the ``.pt`` nesting, ``{w}.0.linear.{i}.weight`` (keys) and ``{w}.1.linear.{i}.weight``
(values), PyTorch layouts, and the options as JSON in the ``hypernetwork`` metadata entry
(:func:`save_hypernetwork`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform
from jaxdiff.models import attention_control as ac

Array = jax.Array
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default


def _leaky(x: Array) -> Array:
    return jax.nn.leaky_relu(x, 0.01)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "leakyrelu": _leaky,
    "elu": jax.nn.elu,
    "swish": jax.nn.hard_swish,  # the format's "swish" is torch's Hardswish
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "celu": jax.nn.celu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "hardsigmoid": jax.nn.hard_sigmoid,
    "hardswish": jax.nn.hard_swish,
    "hardtanh": lambda x: jnp.clip(x, -1.0, 1.0),
    "logsigmoid": jax.nn.log_sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu6": jax.nn.relu6,
    "rrelu": lambda x: jax.nn.leaky_relu(x, (1 / 8 + 1 / 3) / 2),  # eval mode: the mean slope
    "selu": jax.nn.selu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "tanhshrink": lambda x: x - jnp.tanh(x),
    "softshrink": lambda x: jnp.where(jnp.abs(x) > 0.5, x - jnp.sign(x) * 0.5, 0.0),
    "hardshrink": lambda x: jnp.where(jnp.abs(x) > 0.5, x, 0.0),
}
"""``activation_func`` names -> functions with torch's default arguments (eval mode)."""

OPTION_KEYS = ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "use_dropout",
               "dropout_structure", "last_layer_dropout", "activate_output", "name", "step", "sd_checkpoint",
               "sd_checkpoint_name", "optional_info", "skip_connection")


class HypernetworkFormatError(ValueError):
    """A hypernetwork file jaxdiff cannot read, or one that does not fit the model."""


# ---- the networks -----------------------------------------------------------------------------------------


@pytree_dataclass
class HyperLayer:
    """One linear layer (``weight`` (in, out), ``bias`` (out,)), optionally followed by a layer norm and the
    activation (before or after the norm). ``index`` / ``norm_index``: the torch Sequential indices."""

    weight: Array
    bias: Array
    norm_scale: Array | None = None
    norm_bias: Array | None = None
    activate: bool = static_field(default=False)
    act_first: bool = static_field(default=True)
    index: int = static_field(default=0)
    norm_index: int = static_field(default=-1)

    def __call__(self, x: Array, act: Callable[[Array], Array]) -> Array:
        h = x @ self.weight + self.bias
        if self.activate and self.act_first:
            h = act(h)
        if self.norm_scale is not None:
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * self.norm_scale + self.norm_bias
        if self.activate and not self.act_first:
            h = act(h)
        return h


@pytree_dataclass
class HyperMLP:
    """``f(c)``: the layers in turn (float32); the residual ``c + s * f(c)`` is applied by the control."""

    layers: tuple
    activation: str = static_field(default="linear")

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.activation]
        h = x.astype(jnp.float32)
        for layer in self.layers:
            h = layer(h, act)
        return h


@pytree_dataclass
class Hypernetwork:
    """A hypernetwork file: ``modules`` ``{width: (keys MLP, values MLP)}`` and its options (static JSON)."""

    modules: dict
    options: str = static_field(default="{}")

    @property
    def config(self) -> dict:
        return json.loads(self.options)

    @property
    def widths(self) -> list[int]:
        return sorted(self.modules)

    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(self.modules))


# ---- reading ---------------------------------------------------------------------------------------------


_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


def _mlp_from_state(state: Mapping[str, Any], width: int, options: Mapping[str, Any], where: str) -> HyperMLP:
    """One MLP from a torch Sequential's state dict (``linear.{i}.weight/bias``), laid out for jaxdiff."""
    if set(state) >= {"linear1.weight", "linear2.weight"}:  # the original NovelAI layout
        state = {k.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): v for k, v in state.items()}
    entries: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = _KEY.match(str(key))
        if m is None:
            raise HypernetworkFormatError(f"{where}: unexpected entry {key!r} (expected linear.<i>.weight / .bias)")
        entries.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value, np.float32)
    activation = str(options.get("activation_func") or "linear").lower()
    if activation not in ACTIVATIONS:
        raise HypernetworkFormatError(f"{where}: activation {activation!r} is not supported; supported: "
                                      f"{', '.join(sorted(ACTIVATIONS))}")
    linears = [i for i in sorted(entries) if entries[i].get("weight", np.zeros(0)).ndim == 2]
    if not linears:
        raise HypernetworkFormatError(f"{where}: no linear layers")
    layers, width_in = [], width
    activate_output = bool(options.get("activate_output", False))
    for j, i in enumerate(linears):
        w, b = entries[i].get("weight"), entries[i].get("bias")
        if b is None or w.shape[1] != width_in or b.shape != (w.shape[0],):
            raise HypernetworkFormatError(f"{where}: linear.{i} has weight {w.shape} and bias "
                                          f"{None if b is None else b.shape}; expected (out, {width_in}) and (out,)")
        stop = linears[j + 1] if j + 1 < len(linears) else max(entries) + 1
        norms = [k for k in sorted(entries) if i < k < stop]
        if len(norms) > 1 or any(entries[k].get("weight", np.zeros((0, 0))).ndim != 1 for k in norms):
            raise HypernetworkFormatError(f"{where}: entries {norms} after linear.{i} are not one layer norm")
        activate = activation != "linear" and (j < len(linears) - 1 or activate_output)
        norm = norms[0] if norms else -1
        scale = bias = None
        if norms:
            scale, bias = entries[norm].get("weight"), entries[norm].get("bias")
            if bias is None or scale.shape != (w.shape[0],) or bias.shape != scale.shape:
                raise HypernetworkFormatError(f"{where}: layer norm linear.{norm} does not fit linear.{i}")
        # a parameter-free module between the linear and its norm: the activation comes first
        act_first = not norms or norm - i >= 2 if activate else True
        layers.append(HyperLayer(jnp.asarray(w.T), jnp.asarray(b), None if scale is None else jnp.asarray(scale),
                                 None if bias is None else jnp.asarray(bias), activate, act_first, i, norm))
        width_in = w.shape[0]
    if width_in != width:
        raise HypernetworkFormatError(f"{where}: the MLP ends at width {width_in}, not its context width {width}")
    return HyperMLP(tuple(layers), activation)


def _jsonable(v: Any) -> Any:
    """An option as JSON (small arrays as lists; large ones, e.g. optimiser states, as a placeholder)."""
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 16 else f"<array {list(v.shape)}>"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def hypernetwork_from_dict(data: Mapping[Any, Any], where: str = "<dict>") -> Hypernetwork:
    """A :class:`Hypernetwork` from the ``.pt`` dict (int width keys -> ``[keys, values]`` state dicts)."""
    options, modules = {}, {}
    for key, value in data.items():
        if not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            options[str(key)] = _jsonable(value)  # layer_structure, activation_func, ... (OPTION_KEYS) and extras
    for key, value in data.items():
        if str(key) in options:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(s, dict) for s in value):
            raise HypernetworkFormatError(f"{where}: width {key} must hold two state dicts (keys, values)")
        w = int(key)
        modules[w] = tuple(_mlp_from_state(s, w, options, f"{where} [{w}][{j}]") for j, s in enumerate(value))
    if not modules:
        raise HypernetworkFormatError(f"{where} holds no hypernetwork modules (no int width keys)")
    return Hypernetwork(modules, json.dumps(options, sort_keys=True))


def load_hypernetwork(path: str | os.PathLike) -> Hypernetwork:
    """Read a hypernetwork from a ``.pt`` (restricted reader: no pickled code runs) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hypernetwork file {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from jaxdiff.convert.safetensors_io import SafetensorsFile

        with SafetensorsFile(path) as f:
            options = json.loads(f.metadata.get("hypernetwork", "{}"))
            data: dict[Any, Any] = dict(options)
            for name in f:
                m = re.match(r"^(\d+)\.([01])\.(.+)$", name)
                if m is None:
                    raise HypernetworkFormatError(f"{path}: unexpected tensor {name!r} (expected <width>.<0|1>."
                                                  "linear.<i>.weight)")
                pair = data.setdefault(int(m.group(1)), [{}, {}])
                pair[int(m.group(2))][m.group(3)] = np.array(f[name])
        return hypernetwork_from_dict(data, str(path))
    from jaxdiff.convert.pt_reader import read_pt

    data = read_pt(path)
    if not isinstance(data, dict):
        raise HypernetworkFormatError(f"{path} holds a {type(data).__name__}, not a hypernetwork dict")
    return hypernetwork_from_dict(data, str(path))


def hypernetwork_tensors(hn: Hypernetwork) -> dict[str, np.ndarray]:
    """The flat safetensors names and PyTorch-layout arrays of ``hn`` (module docstring)."""
    out = {}
    for w, pair in hn.modules.items():
        for j, mlp in enumerate(pair):
            for layer in mlp.layers:
                out[f"{w}.{j}.linear.{layer.index}.weight"] = np.asarray(layer.weight, np.float32).T
                out[f"{w}.{j}.linear.{layer.index}.bias"] = np.asarray(layer.bias, np.float32)
                if layer.norm_scale is not None:
                    out[f"{w}.{j}.linear.{layer.norm_index}.weight"] = np.asarray(layer.norm_scale, np.float32)
                    out[f"{w}.{j}.linear.{layer.norm_index}.bias"] = np.asarray(layer.norm_bias, np.float32)
    return out


def save_hypernetwork(path: str | os.PathLike, hn: Hypernetwork) -> Path:
    """Write ``hn`` as safetensors (names and metadata of the module docstring); :func:`load_hypernetwork` reads it."""
    from jaxdiff.convert.export import write_safetensors

    return write_safetensors(path, hypernetwork_tensors(hn), {"format": "pt", "hypernetwork": hn.options})


# ---- applying -----------------------------------------------------------------------------------------------


@pytree_dataclass
class Residual:
    """``c + strength * mlps[width](c)`` for a context ``c`` whose width has an MLP; other contexts unchanged."""

    mlps: dict
    strength: Array

    def __call__(self, ctx: Array) -> Array:
        mlp = self.mlps.get(int(ctx.shape[-1]))
        if mlp is None:
            return ctx
        c = ctx.astype(jnp.float32)
        return (c + self.strength * mlp(c)).astype(ctx.dtype)


def hypernetwork_control(hn: Hypernetwork, strength: Any = 1.0) -> ac.Hypernetwork:
    """The attention control applying ``hn`` at ``strength`` (traced) to every attention layer whose context
    width has a module (self- and cross-attention alike)."""
    s = jnp.asarray(strength, jnp.float32)
    keys = {w: pair[0] for w, pair in hn.modules.items()}
    values = {w: pair[1] for w, pair in hn.modules.items()}
    return ac.Hypernetwork(Residual(keys, s), Residual(values, s), where=ac.EVERYWHERE)


def hypernetworks(*items: Hypernetwork | tuple[Hypernetwork, Any]) -> Transform:
    """Network transform applying hypernetworks in order, each ``hn`` or ``(hn, strength)``; the U-Net network
    must read ``cond["attention"]`` (the Stable Diffusion recipe's does):
    ``sd(prompt, network_transform=hypernetworks((hn, 0.8)))``."""
    controls = [hypernetwork_control(*(it if isinstance(it, tuple) else (it,))) for it in items]
    return ac.attention_control(*controls)


# ---- creating and training ----------------------------------------------------------------------------------


def init_hypernetwork(widths: Sequence[int], *, layer_structure: Sequence[float] = (1, 2, 1),
                      activation: str = "linear", layer_norm: bool = False, activate_output: bool = False,
                      std: float = 0.01, seed: int = 0, name: str = "hypernetwork") -> Hypernetwork:
    """A new hypernetwork: weights ``N(0, std)``, zero biases, unit layer norms (a small start: close to the
    plain model). Sequential indices as the format lays them out (linear, activation, layer norm)."""
    activation = activation.lower()
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    ls = list(layer_structure)
    if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
        raise ValueError(f"layer_structure must start and end with 1 (the context width), got {ls}")
    rng = np.random.default_rng(seed)
    modules = {}
    for w in widths:
        pair = []
        for _ in range(2):
            layers, index = [], 0
            for j in range(len(ls) - 1):
                d_in, d_out = int(w * ls[j]), int(w * ls[j + 1])
                activate = activation != "linear" and (j < len(ls) - 2 or activate_output)
                norm_index = index + 1 + int(activate) if layer_norm else -1
                weight = rng.normal(0.0, std, (d_in, d_out)).astype(np.float32)
                layers.append(HyperLayer(jnp.asarray(weight), jnp.zeros(d_out, jnp.float32),
                                         jnp.ones(d_out, jnp.float32) if layer_norm else None,
                                         jnp.zeros(d_out, jnp.float32) if layer_norm else None,
                                         activate, True, index, norm_index))
                index += 1 + int(activate) + int(layer_norm)
            pair.append(HyperMLP(tuple(layers), activation))
        modules[int(w)] = tuple(pair)
    options = {"layer_structure": ls, "activation_func": activation, "is_layer_norm": layer_norm,
               "activate_output": activate_output, "use_dropout": False, "weight_initialization": "Normal",
               "name": name}
    return Hypernetwork(modules, json.dumps(options, sort_keys=True))


def train_hypernetwork(sd: Any, images: Any, prompts: Sequence[str], *, hypernetwork: Hypernetwork | None = None,
                       widths: Sequence[int] | None = None, steps: int = 300, learning_rate: float = 1e-3,
                       batch_size: int = 8, seed: int = 0, latents: Any = None, **init: Any
                       ) -> tuple[Hypernetwork, np.ndarray]:
    """Train a hypernetwork on the frozen Stable Diffusion ``sd`` from ``images`` (N, H, W, 3) in [0, 1] and
    their ``prompts``, with the DDPM epsilon loss (Ho et al. 2020, Eq. 14) at strength 1; only the MLPs
    change. Starts from ``hypernetwork`` or :func:`init_hypernetwork` (``widths``, default the text width,
    i.e. the cross-attention layers; ``**init`` its options). Returns ``(hypernetwork, loss per step)``."""
    from jaxdiff.textual_inversion import denoising_loss, encode_images, optimise, table_shape

    if len(prompts) != len(images if latents is None else latents):
        raise ValueError("give one prompt per training image")
    if hypernetwork is None:
        widths = list(widths) if widths is not None else [table_shape(sd.models.text_encoder)[1]]
        hypernetwork = init_hypernetwork(widths, seed=seed, **init)
    x0 = np.asarray(encode_images(sd, images) if latents is None else latents, np.float32)
    ids = jnp.asarray(sd.tokenize(list(prompts)))
    encode = jax.jit(lambda m, i: m.encode_text(i))
    context = np.concatenate([np.asarray(encode(sd.models, ids[k: k + 64])) for k in range(0, len(ids), 64)])

    def objective(hn: Hypernetwork, frozen: tuple, batch: dict, key: Array) -> Array:
        models, loss = frozen
        den = models.denoiser(network_transform=hypernetworks(hn))
        return loss(den, batch["x"], key, {"context": batch["context"]}).mean()

    hn, history = optimise(objective, hypernetwork, (sd.models, denoising_loss(sd)), {"x": x0, "context": context},
                           steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    return hn, history
