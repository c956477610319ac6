"""Built-in models trained here on scikit-learn's 8x8 digits, shipped as safetensors (no download).

=====================  ==========================================================================
name                   what it is
=====================  ==========================================================================
``digits``             class-conditional pixel U-Net (diffusers ``UNet2DModel`` layout), epsilon
                       prediction on a 1000-step cosine VP schedule (Nichol & Dhariwal 2021);
                       label 10 is the null class for classifier-free guidance (Ho & Salimans 2022)
``digits-ncsn``        noise conditional score network (Song & Ermon 2019; NCSNv2's
                       ``s(x, sigma) = -eps(x, sigma) / sigma``), a U-Net fed ``log sigma``, for
                       annealed Langevin dynamics (or any other sampler: it is a denoiser too)
``digits-classifier``  noisy digit classifier on the ``digits`` VP schedule, for classifier guidance
                       (Dhariwal & Nichol 2021)
``digits-eval``        clean-image digit classifier used to judge samples (accuracy, Frechet distance)
``digits-sd``          a Stable Diffusion folder (diffusers layout) for 32x32 coloured digits from
                       captions such as "a thick red seven on a white background"
                       (:mod:`jaxdiff.data.digits_text`); its text encoder is ``digits-clip``'s
``digits-clip``        CLIP text and image towers (transformers ``CLIPModel`` folder) trained on the
                       same captioned digits; zero-shot digit classification and retrieval
``digits-palette``     Palette image-to-image U-Net (inpainting, uncropping, restoration) on 8x8
                       digits (:mod:`jaxdiff.pipelines.palette`; ``examples/palette/``)
``digits-dit``         class-conditional Diffusion Transformer (Peebles & Xie 2023) on 8x8 digits in
                       pixels, a DiT pipeline folder (:mod:`jaxdiff.pipelines.dit`; ``examples/dit/``)
``digits-video``       class-conditional video diffusion (Ho et al. 2022) on 8-frame 16x16 moving digits
                       (:mod:`jaxdiff.pipelines.video`; ``examples/video/``)
=====================  ==========================================================================

The first four live in ``jaxdiff/assets/digits/<name>/``: ``config.json`` (network config, adapter,
training record) and ``model.safetensors`` (PyTorch-style names and layouts, read by jaxdiff's own
reader); their training scripts are in ``examples/digits/``. Images are NHWC in [-1, 1] inside the
models; :func:`sample_builtin` returns them in [0, 1]. ``digits-sd`` and ``digits-clip`` are ordinary
diffusers / transformers folders (:func:`builtin_folder`), loaded as any other
(:func:`load_pipeline`, :func:`load_clip`); ``examples/digits_sd/train.py`` retrains them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import conditioning
from jaxdiff import guidance as G
from jaxdiff import parallel, sampling, schedules
from jaxdiff._pytree import pytree_dataclass
from jaxdiff.convert import abstract, load_torch_tensors, open_safetensors
from jaxdiff.denoisers import DiscreteVPClassifier, DiscreteVPDenoiser, VEDenoiser
from jaxdiff.models._pure import PureModel
from jaxdiff.models.classifier import DigitClassifier, DigitClassifierConfig
from jaxdiff.models.unet2d import UNet2DConfig, UNet2DModel
from jaxdiff.samplers import Langevin, get_sampler

Array = jax.Array
ASSETS = Path(__file__).parent / "assets" / "digits"

BUILTIN_MODELS: dict[str, str] = {
    "digits": "class-conditional U-Net on 8x8 digits (classifier-free guidance; label 0-9)",
    "digits-ncsn": "unconditional noise conditional score network on 8x8 digits (annealed Langevin)",
}
"""Models :func:`sample_builtin` samples from: name -> description."""

BUILTIN_CLASSIFIERS: dict[str, str] = {
    "digits-classifier": "noisy 8x8 digit classifier on the `digits` VP schedule (classifier guidance)",
    "digits-eval": "clean 8x8 digit classifier for evaluating samples (logits; `features` for Frechet distance)",
}
"""Classifiers :func:`load_builtin` also loads: name -> description."""

BUILTIN_PIPELINES: dict[str, str] = {
    "digits-sd": "text-to-image Stable Diffusion on 32x32 coloured digits "
                 "(\"a thick red seven on a white background\")",
}
"""Stable Diffusion folders :func:`load_pipeline` loads (and ``jaxdiff sample --model`` takes): name -> description."""

PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits-sd": {"steps": 20, "guidance": 3.0},
}
"""``jaxdiff sample`` settings a built-in pipeline samples best with (``benchmarks/text_to_image_quality.py``: digit and
colour accuracy peak at guidance 3; at SD's 7.5 colours fall to 0.93); options given on the command line win."""

BUILTIN_ENCODERS: dict[str, str] = {
    "digits-clip": "CLIP text and image towers on the captioned colour digits (zero-shot digits, retrieval)",
}
"""CLIP models :func:`load_clip` loads: name -> description."""

BUILTIN_CONTROLS: dict[str, str] = {
    "digits-controlnet": "ControlNet for digits-sd: follows a digit's Canny edge map (32x32 white-on-black RGB)",
    "digits-adapter": "T2I-Adapter (full) for digits-sd: follows a digit's Canny edge map (32x32 white-on-black RGB)",
}
"""Side networks for ``digits-sd`` (diffusers ``ControlNetModel`` / ``T2IAdapter`` folders; trained by
``examples/digits_sd/train_control.py``): name -> description. :func:`builtin_folder` gives their folders, which
``jaxdiff sample --controlnet`` / ``--adapter`` also take by name."""

BUILTIN_PERSONAL: dict[str, str] = {
    "digits-outline": "a LoRA, a textual-inversion token (<outline>) and a hypernetwork teaching digits-sd outlined "
                      "(hollow) strokes",
}
"""Personalisation files for ``digits-sd`` (``outline_lora.safetensors`` in kohya's format,
``outline_embedding.safetensors``, ``outline_hypernetwork.safetensors``; trained by
``examples/digits_sd/train_personal.py``): name -> description, folders from :func:`builtin_folder`."""

BUILTIN_IMAGE_TO_IMAGE: dict[str, str] = {
    "digits-palette": "Palette (Saharia et al. 2022) on 8x8 digits: inpainting, uncropping, restoration (blur + noise, "
                      "JPEG) in one model (examples/palette/train_palette.py; jaxdiff.pipelines.palette)",
}
"""Image-to-image models (:class:`jaxdiff.pipelines.palette.Palette`): name -> description."""

BUILTIN_TRANSFORMERS: dict[str, str] = {
    "digits-dit": "class-conditional DiT (Peebles & Xie 2023; adaLN-Zero, 6 blocks 80 wide, patch 1, 0.88M "
                  "parameters) on 8x8 digits in pixels (label 0-9; examples/dit/train.py; jaxdiff.pipelines.dit)",
}
"""Class-conditional DiT pipeline folders (:class:`jaxdiff.pipelines.dit.DiTPipeline`, :func:`sample_dit`):
name -> description."""

DIT_DEFAULTS: dict[str, Any] = {"sampler": "dpmpp_2m", "schedule": "karras", "steps": 20, "guidance": 3.0}
"""How :func:`sample_dit` samples by default (``benchmarks/dit_scaling.py`` measures these settings); Karras and
exponential schedules are capped at :data:`DIT_SIGMA_MAX`, as ``digits`` (its ``sigma_max_sampling``)."""
DIT_SIGMA_MAX = 80.0
BUILTIN_VIDEO: dict[str, str] = {
    "digits-video": "class-conditional video diffusion (Ho et al. 2022) on 8-frame 16x16 moving digits, joint "
                    "image-video training (examples/video/train.py; jaxdiff.pipelines.video)",
}
"""Video models (:func:`jaxdiff.pipelines.video.load_video_model` on :func:`builtin_folder`): name -> description."""

SCHEDULE_NAMES = ("karras", "exponential", "linear", "ncsn_geometric", "vp_discrete")


# ---- adapters --------------------------------------------------------------------------------

@pytree_dataclass
class AffineNoiseInput:
    """``net(x, scale * c_noise + shift, cond)``: maps ``log sigma`` onto the U-Net's timestep range."""

    net: Any
    scale: Array
    shift: Array

    def __call__(self, x: Array, c_noise: Array, cond: Any = None) -> Array:
        return self.net(x, self.scale * c_noise + self.shift, cond)


@pytree_dataclass
class NCSNDenoiser:
    """NCSNv2's score network as a denoiser: ``s(x, sigma) = -net(x, t(sigma)) / sigma`` (Song & Ermon 2020).

    That is :class:`~jaxdiff.denoisers.VEDenoiser` with epsilon prediction, fed the timestep
    ``t = scale * log(sigma) + shift`` (see :func:`ncsn_time_map`). ``net`` is the field a training
    objective fills in, so training and sampling run through this same adapter.
    """

    net: Any
    scale: Array
    shift: Array

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        inner = AffineNoiseInput(self.net, self.scale, self.shift)
        return VEDenoiser(inner, "epsilon", noise_input="log_sigma")(x, sigma, cond)


def ncsn_time_map(sigma_min: float, sigma_max: float, t_max: float = 999.0) -> tuple[float, float]:
    """``(scale, shift)`` sending ``log sigma_min -> 0`` and ``log sigma_max -> t_max``."""
    lo, hi = np.log(sigma_min), np.log(sigma_max)
    scale = t_max / (hi - lo)
    return float(scale), float(-lo * scale)


def ncsn_denoiser(net: Any, adapter: Mapping[str, Any]) -> NCSNDenoiser:
    """The NCSN adapter for a model's ``adapter`` config (``net=None`` gives a training template)."""
    if adapter.get("prediction", "epsilon") != "epsilon":
        raise ValueError("the built-in NCSN adapter supports prediction='epsilon' only")
    scale, shift = ncsn_time_map(adapter["sigma_min"], adapter["sigma_max"])
    return NCSNDenoiser(net, jnp.float32(scale), jnp.float32(shift))


def vp_alphas_cumprod(adapter: Mapping[str, Any]) -> np.ndarray:
    """The training schedule ``abar_t`` named in a model's adapter config."""
    betas = schedules.vp_betas(adapter["beta_schedule"], adapter["num_train_timesteps"],
                               adapter.get("beta_start", 0.0001), adapter.get("beta_end", 0.02))
    return schedules.alphas_cumprod(betas)


# ---- loading ---------------------------------------------------------------------------------

def _check_name(name: str, valid: Mapping[str, str] | None = None) -> None:
    valid = valid if valid is not None else {**BUILTIN_MODELS, **BUILTIN_CLASSIFIERS}
    if name not in valid:
        raise ValueError(f"unknown built-in model {name!r}; valid names: {', '.join(valid)}")


def builtin_folder(name: str) -> Path:
    """The shipped folder of ``digits-sd``, ``digits-clip``, ``digits-controlnet``, ``digits-adapter``,
    ``digits-outline``, ``digits-palette``, ``digits-dit`` or ``digits-video``."""
    _check_name(name, {**BUILTIN_PIPELINES, **BUILTIN_ENCODERS, **BUILTIN_CONTROLS, **BUILTIN_PERSONAL,
                       **BUILTIN_IMAGE_TO_IMAGE, **BUILTIN_TRANSFORMERS, **BUILTIN_VIDEO})
    path = ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(f"the weights of {name!r} are missing ({path}); reinstall jaxdiff or train them "
                                f"with examples/digits_sd/train.py (train_control.py for the side networks)")
    return path


def load_pipeline(name: str = "digits-sd", **kwargs: Any) -> Any:
    """A built-in Stable Diffusion folder as :class:`~jaxdiff.pipelines.StableDiffusion` (``kwargs`` go to
    its ``from_pretrained``)."""
    from jaxdiff.pipelines import StableDiffusion

    _check_name(name, BUILTIN_PIPELINES)
    return StableDiffusion.from_pretrained(builtin_folder(name), **kwargs)


def load_clip(name: str = "digits-clip") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a built-in CLIP: :class:`~jaxdiff.models.clip.CLIPModel` (``get_text_features``,
    ``get_image_features``, ``text_tower()``) and its tokenizer (a transformers ``CLIPTokenizer``: token ids are
    the model's own, not OpenAI's)."""
    from jaxdiff.convert.folders import load_model_folder
    from jaxdiff.models.tokenizers import load_tokenizer

    _check_name(name, BUILTIN_ENCODERS)
    folder = builtin_folder(name)
    return load_model_folder(folder), load_tokenizer(folder)


def builtin_config(name: str) -> dict:
    """The ``config.json`` of a built-in model: ``network``, ``adapter``, ``training`` and ``sampling``."""
    _check_name(name)
    path = ASSETS / name / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"the weights of {name!r} are missing ({path}); reinstall jaxdiff or train them "
                                f"with the scripts in examples/digits/")
    return json.loads(path.read_text())


def build_network(network: Mapping[str, Any]) -> nnx.Module:
    """An abstract (shape-only) network from a config dict with ``_class_name``."""
    kind = network.get("_class_name")
    if kind == "UNet2DModel":
        cfg = UNet2DConfig.from_dict(network)
        return abstract(lambda: UNet2DModel(cfg, rngs=nnx.Rngs(0)))
    if kind == "DigitClassifier":
        ccfg = DigitClassifierConfig.from_dict(network)
        return abstract(lambda: DigitClassifier(ccfg, rngs=nnx.Rngs(0)))
    raise ValueError(f"unknown network class {kind!r}; expected UNet2DModel or DigitClassifier")


@functools.lru_cache(maxsize=None)
def load_network(name: str) -> PureModel:
    """The network of a built-in model with its shipped weights, as a pure callable."""
    cfg = builtin_config(name)
    with open_safetensors(ASSETS / name / "model.safetensors") as tensors:
        module = load_torch_tensors(build_network(cfg["network"]), tensors)
    return PureModel.of(module)


def load_builtin(name: str, network_transform: Any = None) -> Any:
    """A built-in model by name, ready for jaxdiff's samplers and guidance.

    ``digits``: :class:`~jaxdiff.denoisers.DiscreteVPDenoiser` whose ``cond`` is a (B,) int label array
    (10 = no label); ``digits-ncsn``: :class:`~jaxdiff.denoisers.VEDenoiser` (unconditional);
    ``digits-classifier``: :class:`~jaxdiff.denoisers.DiscreteVPClassifier` ``(x, sigma) -> logits``;
    ``digits-eval``: the clean classifier ``x -> logits`` (``.bind("features")`` for its features).
    ``network_transform`` (:mod:`jaxdiff.conditioning`) wraps the two generative models' U-Net,
    ``net(x, t, labels)`` (the pixel ``UNet2DModel``: ``cond`` is its class labels, or None).
    """
    _check_name(name)
    cfg, net = builtin_config(name), load_network(name)
    adapter = cfg["adapter"]
    kind = adapter["kind"]
    if network_transform is not None:
        if kind not in ("discrete_vp", "ve"):
            raise ValueError(f"{name} is a classifier: network transforms apply to 'digits' and 'digits-ncsn'")
        net = conditioning.apply(net, network_transform)
    if kind == "discrete_vp":
        return DiscreteVPDenoiser(net, jnp.asarray(vp_alphas_cumprod(adapter)), adapter["prediction"])
    if kind == "ve":
        return ncsn_denoiser(net, adapter)
    if kind == "discrete_vp_classifier":
        return DiscreteVPClassifier(net, jnp.asarray(vp_alphas_cumprod(adapter)))
    if kind == "classifier":
        return net
    raise ValueError(f"{name}: unknown adapter kind {kind!r} in its config.json")


# ---- sampling --------------------------------------------------------------------------------

def sigma_range(name: str) -> tuple[float, float]:
    """The ``(sigma_min, sigma_max)`` a built-in generative model samples over."""
    _check_name(name, BUILTIN_MODELS)
    adapter = builtin_config(name)["adapter"]
    if adapter["kind"] == "ve":
        return float(adapter["sigma_min"]), float(adapter["sigma_max"])
    ac = vp_alphas_cumprod(adapter)
    train = schedules.vp_sigmas(ac)
    return float(train[0]), float(min(train[-1], adapter.get("sigma_max_sampling", 80.0)))


def make_sigmas(name: str, schedule: str, steps: int) -> schedules.Sigmas:
    """A schedule of ``steps`` levels over the model's noise range (capacity 1000: one compile for any count).

    ``vp_discrete`` takes the training timesteps with diffusers' default ``leading`` spacing
    (``t = (steps - 1 - i) * (1000 // steps)``): all 1000 for DDPM, 980, 960, ..., 0 for 50 steps.
    ``trailing`` spacing would start at t = 999, where the cosine schedule's sigma is ~2e4 and
    an x0 estimate from epsilon is too inaccurate for a deterministic sampler to recover.
    """
    _check_name(name, BUILTIN_MODELS)
    if not 1 <= steps <= schedules.DEFAULT_CAPACITY:
        raise ValueError(f"steps must be between 1 and {schedules.DEFAULT_CAPACITY}, got {steps}")
    lo, hi = sigma_range(name)
    if schedule in ("karras", "exponential", "linear"):
        return schedules.get_schedule(schedule)(steps, lo, hi)
    if schedule == "ncsn_geometric":
        return schedules.ncsn_geometric(steps, lo, hi)
    if schedule == "vp_discrete":
        adapter = builtin_config(name)["adapter"]
        if adapter["kind"] != "discrete_vp":
            raise ValueError(f"the vp_discrete schedule needs a VP model; {name!r} is not one")
        return schedules.vp_discrete(steps, vp_alphas_cumprod(adapter), "leading")
    raise ValueError(f"unknown schedule {schedule!r} for built-in models; valid: {', '.join(SCHEDULE_NAMES)}")


def labels_for(num: int, label: int | None) -> np.ndarray:
    """Labels of a conditional batch: ``label`` repeated, or 0, 1, ..., 9, 0, ... when None."""
    if label is None:
        return np.arange(num, dtype=np.int32) % 10
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label must be a digit 0-9 (or None to cycle through them), got {label}")
    return np.full((num,), int(label), np.int32)


def network_batch(name: str, num: int, guidance: float = 1.0, classifier_scale: float = 0.0) -> int:
    """The batch each network call of :func:`guided_denoiser` sees: ``2 num`` under classifier-free guidance."""
    cfg = name == "digits" and classifier_scale <= 0 and guidance not in (0.0, 1.0)
    return 2 * num if cfg else num


def guided_denoiser(name: str, labels: Any = None, *, guidance: float = 1.0, classifier_scale: float = 0.0,
                    split: Any = None, transform: Any = None, network_transform: Any = None) -> tuple[Any, Any]:
    """``(denoiser, cond)`` for sampling a built-in model.

    ``digits``: ``guidance`` is the classifier-free scale (1: the conditional model alone, no second
    batch; 0: the unconditional model); ``classifier_scale > 0`` instead guides the *unconditional* model (null label) with the
    noisy classifier ``digits-classifier``. ``digits-ncsn`` is unconditional (labels must be None).
    ``split`` (a ``NamedSharding``) splits the network's batch (:func:`network_batch`) over devices.
    ``network_transform`` wraps the U-Net (see :func:`load_builtin`), ``transform`` (denoiser transforms)
    the guided denoiser.
    """
    _check_name(name, BUILTIN_MODELS)
    den = load_builtin(name, network_transform)
    if split is not None:
        den = parallel.ShardBatch(den, split)
    if name == "digits-ncsn":
        if labels is not None:
            raise ValueError("digits-ncsn is unconditional: pass label=None (use 'digits' for a chosen digit)")
        return G.apply(den, transform), None
    labels = jnp.asarray(labels, jnp.int32)
    null = jnp.full(labels.shape, builtin_config(name)["adapter"]["null_label"], jnp.int32)
    if classifier_scale > 0:
        clf = load_builtin("digits-classifier")
        guide = G.chain(G.bind(null), G.classifier_guidance(clf, classifier_scale))
    elif guidance == 1.0:
        guide = None
    elif guidance == 0.0:  # the unconditional model: one batch with the null label
        guide = G.bind(null)
    else:
        guide = G.classifier_free(guidance, null)
    return G.apply(den, guide, transform), labels


def default_sampler(name: str, sampler: str) -> Any:
    """A sampler by name; Langevin gets the step size and steps per level stored with the model."""
    if sampler == "langevin":
        opts = builtin_config(name).get("sampling", {}).get("langevin", {})
        return Langevin(eps=opts.get("eps", 2e-5), n_steps=opts.get("n_steps", 5))
    return get_sampler(sampler)


def sample_builtin(name: str = "digits", *, num: int = 16, label: int | None = None, sampler: str = "dpmpp_2m",
                   schedule: str | None = None, steps: int | None = None, guidance: float = 3.0,
                   classifier_scale: float = 0.0, seed: int = 0, progress: bool = False,
                   mesh: Any = "auto", transform: Any = None, network_transform: Any = None) -> np.ndarray:
    """Sample ``num`` digits from a built-in model: ``(num, 8, 8, 1)`` float32 in [0, 1].

    ``label=None`` cycles through 0..9 (so a grid shows every digit); ``guidance`` is the
    classifier-free scale of ``digits`` and ``classifier_scale > 0`` switches to classifier guidance
    (see :func:`guided_denoiser`); ``digits-ncsn`` is unconditional and ignores both. ``schedule`` defaults to ``karras`` (``ncsn_geometric`` for
    Langevin); ``steps`` to 20 (the trained level count for Langevin on ``digits-ncsn``).
    ``mesh="auto"`` splits each network call's batch over the CPU devices that divide it
    (:func:`jaxdiff.parallel.batch_mesh`; one per core by default, see :mod:`jaxdiff.cpu_devices`; no progress
    bar then); ``None`` runs on one device, or give a 1-D ``data`` mesh. ``transform`` / ``network_transform``:
    denoiser and network transforms, run inside the compiled loop (see :func:`guided_denoiser`).
    """
    _check_name(name, BUILTIN_MODELS)
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    langevin = sampler == "langevin"
    schedule = schedule or ("ncsn_geometric" if langevin else "karras")
    if steps is None:
        steps = builtin_config(name).get("sampling", {}).get("langevin", {}).get("num_levels", 20) if langevin else 20
    sigmas = make_sigmas(name, schedule, steps)
    if name == "digits-ncsn" and label is not None:
        raise ValueError("digits-ncsn is unconditional: pass label=None (use 'digits' for a chosen digit)")
    labels = None if name == "digits-ncsn" else labels_for(num, label)
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be 'auto', None or a jax Mesh, got {mesh!r}")
        mesh = parallel.batch_mesh(network_batch(name, num, guidance, classifier_scale))
    split = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA))
    progress = progress and split is None
    den, cond = guided_denoiser(name, labels, guidance=guidance, classifier_scale=classifier_scale, split=split,
                                transform=transform, network_transform=network_transform)
    key = jax.random.key(seed)
    vp = name == "digits"
    x = sampling.initial_noise(jax.random.fold_in(key, 1), (num, 8, 8, 1), sigmas.values[0], 1.0 if vp else 0.0)
    out = sampling.sample(den, default_sampler(name, sampler), sigmas, x, jax.random.fold_in(key, 2), cond,
                          progress=progress)
    return np.clip((np.asarray(out, np.float32) + 1.0) / 2.0, 0.0, 1.0)


@functools.lru_cache(maxsize=None)
def load_dit(name: str = "digits-dit") -> Any:
    """A built-in DiT as :class:`~jaxdiff.pipelines.dit.DiTPipeline` (loaded once per process)."""
    from jaxdiff.pipelines.dit import DiTPipeline

    _check_name(name, BUILTIN_TRANSFORMERS)
    return DiTPipeline.from_pretrained(builtin_folder(name))


def sample_dit(name: str = "digits-dit", *, num: int = 16, label: int | None = None, sampler: str | None = None,
               schedule: str | None = None, steps: int | None = None, guidance: float | None = None,
               seed: int = 0) -> np.ndarray:
    """Sample ``num`` digits from a built-in DiT: ``(num, 8, 8, 1)`` float32 in [0, 1].

    ``label=None`` cycles through 0..9; the other settings default to :data:`DIT_DEFAULTS` (DPM-Solver++ 2M,
    20 Karras steps up to sigma 80, classifier-free guidance 3 on every channel; guidance <= 1 is the conditional
    model alone).
    """
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    given = {"sampler": sampler, "schedule": schedule, "steps": steps, "guidance": guidance}
    opts = {**DIT_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    labels = labels_for(num, label)
    cap = DIT_SIGMA_MAX if opts["schedule"] in ("karras", "exponential") else None
    return load_dit(name)(labels, seed=seed, sigma_max=cap, **opts)


# ---- pictures --------------------------------------------------------------------------------

def image_grid(images: Any, ncol: int | None = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) images in [0, 1] into one uint8 picture, each pixel a ``scale x scale`` block."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    big = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    H, W = h * scale + pad, w * scale + pad
    grid = np.full((nrow * H + pad, ncol * W + pad, c), 0.5, np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * H: pad + r * H + h * scale, pad + k * W: pad + k * W + w * scale] = big[i]
    grid = (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)
    return grid[..., 0] if c == 1 else grid


def save_grid(images: Any, path: str | Path, ncol: int | None = None, scale: int = 4) -> Path:
    """Write :func:`image_grid` as a PNG (ink is white on black, as the data's 0..16 values; grey borders)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, ncol, scale)).save(path)
    return path


# ---- cascades (issue 15) ---------------------------------------------------------------------

BUILTIN_CASCADES: dict[str, str] = {
    "digits-cascade": "Imagen / DeepFloyd IF-style text-to-image cascade on the captioned colour digits: an 8x8 pixel "
                      "base and an 8x8 -> 32x32 super-resolution stage with noise-conditioning augmentation "
                      "(stage_1/ an IFPipeline folder, stage_2/ an IFSuperResolutionPipeline folder; "
                      "examples/cascade/train.py; jaxdiff.pipelines.pixel_cascade)",
}
"""Cascade folders (``stage_1/``, ``stage_2/``, ... each a diffusers pipeline folder): name -> description."""


BUILTIN_UNCLIP: dict[str, str] = {
    "digits-unclip": "DALL-E 2 / unCLIP on the captioned colour digits in digits-clip's embedding space: a diffusion "
                     "prior (text -> image embedding) and a latent decoder on digits-sd's VAE (examples/unclip/train.py; "
                     "jaxdiff.pipelines.unclip_digits)",
}
"""unCLIP models of :mod:`jaxdiff.pipelines.unclip_digits`: name -> description."""


def _shipped_folder(name: str, table: Mapping[str, str], marker: str, recipe: str) -> Path:
    """``ASSETS / name`` for a name of ``table``, checked to hold ``marker`` (else: how to retrain it)."""
    _check_name(name, table)
    path = ASSETS / name
    if not (path / marker).exists():
        raise FileNotFoundError(f"the weights of {name!r} are missing ({path}); reinstall jaxdiff or train them "
                                f"with {recipe}")
    return path


def unclip_folder(name: str = "digits-unclip") -> Path:
    """The shipped folder of a built-in unCLIP model (:data:`BUILTIN_UNCLIP`)."""
    return _shipped_folder(name, BUILTIN_UNCLIP, "model_index.json", "examples/unclip/train.py")


def cascade_folder(name: str = "digits-cascade") -> Path:
    """The shipped folder of a built-in cascade (:data:`BUILTIN_CASCADES`)."""
    return _shipped_folder(name, BUILTIN_CASCADES, "stage_1", "examples/cascade/train.py --install")


def load_cascade(name: str = "digits-cascade") -> Any:
    """A built-in cascade as :class:`jaxdiff.pipelines.pixel_cascade.CascadeModels` (sample it with
    :func:`~jaxdiff.pipelines.pixel_cascade.cascade_stages` and :data:`jaxdiff.pipelines.cascade.cascade_jit`)."""
    from jaxdiff.pipelines.pixel_cascade import load_cascade as _load

    return _load(cascade_folder(name))
