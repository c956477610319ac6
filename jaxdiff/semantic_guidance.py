"""Semantic Diffusion Guidance (Liu et al. 2023, "More Control for Free! Image Synthesis with Semantic Diffusion
Guidance"): steering an *unconditional* model with the gradient of a CLIP similarity.

The paper guides a DDPM step like classifier guidance, with a matching score ``F`` in place of the classifier's
log-probability (its eq. 3)::

    x_{t-1} ~ N(mu + s Sigma grad_{x_t} F(x_t, y, t), Sigma)

and four scores, from a CLIP image encoder ``E_I`` (and its text encoder ``E_L``), all cosines of unit vectors:

- language guidance:        ``F_T = E_I(x) . E_L(l)``
- image content guidance:   ``F_C = E_I(x) . E_I(x')`` for a reference image ``x'``
- image style guidance:     ``F_S = - sum_j || G(E_I^j(x)) - G(E_I^j(x')) ||_F^2`` with ``G`` the Gram matrix of
  the image encoder's intermediate features ``E_I^j``
- multimodal guidance:      a weighted sum, ``F = w_T F_T + w_C F_C + w_S F_S``.

The paper evaluates ``E_I`` on the noisy ``x_t`` with a CLIP fine-tuned on noisy images. Here any clean CLIP
serves, because the score is taken on the denoiser's estimate ``x0_hat = D(x, sigma)`` (as in universal guidance,
Bansal et al. 2023) through :func:`jaxdiff.guidance.energy_guidance` with the loss ``L = -F`` (shifted by constants
to be >= 0: ``1 - cos``):

    D'(x) = D(x) - scale sigma^2 grad_x L(D(x))

which is the paper's step in the EDM coordinates ``x = x0 + sigma noise`` (a score shift ``grad F`` is a
denoiser shift ``sigma^2 grad F``; ``scale`` plays ``s``). ``through_denoiser=True`` differentiates through the
network (``J_D^T grad L``); ``False`` takes ``grad`` w.r.t. ``x0_hat`` (cheaper; ``J_D -> I`` as sigma -> 0).

Images reach CLIP as its image processor prepares them (:class:`ImageProcessing`, read from the model folder's
``preprocessor_config.json``: resize of the shortest edge, centre crop, ``(x - mean) / std``), differentiably.
Latent models (digits-sd, Stable Diffusion) decode ``x0_hat`` with their VAE first (:class:`LatentDecoder`);
pixel models' ``x0_hat`` in [-1, 1] is mapped to [0, 1].

Style features: ``E_I^j`` is the vision transformer's hidden state after layer ``j`` (``hidden_states[j]`` of
transformers' ``CLIPVisionModel``: 0 is the embeddings after ``pre_layrnorm``, ``j >= 1`` the output of layer
``j``), patch tokens only (the class token dropped), ``G = F^T F / N`` over the ``N`` patches (``C x C``), and the
distance per layer is ``||G - G'||_F^2 / C^2``. The paper's encoder was a ResNet whose intermediate feature maps
play this part; which layers is a parameter (``style_layers``), by default the first half of the layers
(digits-clip, 3 layers: ``(1, 2)``; ViT-B/32, 12 layers: ``(1, ..., 6)``), whose features keep colour and texture.

Options for a clean CLIP (:class:`SemanticGuidance`, :meth:`SemanticLoss.terms`): ``normalize`` (the x0 shift
has RMS ``scale * sigma`` whatever CLIP's gradient size), a sigma window, ``shifts`` (the loss averaged over
translated views), ``contrast`` (the text term as CLIP's zero-shot cross-entropy over alternative texts). On
digits-sd with digits-clip, ``normalize=True``, ``sigma_max=5``, ``contrast`` (the ten digit texts), ``shifts``
(the 3 x 3 grid of -3 / 0 / 3 pixel shifts) and differentiation through the denoiser is what
``benchmarks/_editing_sdg.py`` measures.

Usage with a latent model (the unconditional model of digits-sd is its empty prompt at CFG scale 1)::

    sd = builtin.load_pipeline("digits-sd")
    guide = load_guide("digits-clip", decoder=LatentDecoder(sd.models))
    t = guide.guidance(scale=100.0, text="the digit 7")
    images = sd([""] * 8, seed=range(8), guidance=1.0, transform=t)
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._transforms import Transform, as_pytree_callable, float_leaf
from jaxdiff._util import as_leaves, batch_sigma, expand_to
from jaxdiff.guidance import loss_gradient

Array = jax.Array

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
"""transformers' ``CLIPImageProcessor`` defaults (OpenAI CLIP's normalisation)."""


# ---- preprocessing ------------------------------------------------------------------------------------------

@pytree_dataclass
class ImageProcessing:
    """A CLIP image processor's steps on RGB images (B, H, W, 3) in [0, 1], differentiable (transformers'
    ``CLIPImageProcessor`` order: resize the shortest edge to ``shortest_edge`` (bicubic; None: no resize), centre
    crop to ``crop`` (None: none), then ``(x - mean) / std``). ``rescale`` 1/255 is implied: images are in [0, 1].

    The resize is ``jax.image.resize`` (bicubic, antialiased when shrinking), close to but not bit-equal with
    PIL's, which the processor uses on uint8 images."""

    shortest_edge: int | None = static_field(default=None)
    crop: tuple[int, int] | None = static_field(default=None)
    mean: tuple[float, float, float] = static_field(default=OPENAI_MEAN)
    std: tuple[float, float, float] = static_field(default=OPENAI_STD)

    def __call__(self, images: Array) -> Array:
        x = images
        if self.shortest_edge is not None:
            b, h, w, c = x.shape
            short = min(h, w)
            if short != self.shortest_edge:
                nh, nw = (int(round(h * self.shortest_edge / short)), int(round(w * self.shortest_edge / short)))
                nh, nw = (self.shortest_edge, nw) if h <= w else (nh, self.shortest_edge)
                x = jax.image.resize(x, (b, nh, nw, c), "bicubic")
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[1:3]
            if h < ch or w < cw:
                raise ValueError(f"images of {h}x{w} are smaller than the CLIP crop {ch}x{cw}; set shortest_edge "
                                 "(do_resize in preprocessor_config.json) to resize them first")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, top:top + ch, left:left + cw]
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return (x - mean) / std


def _size_of(value: Any, key: str) -> Any:
    if value is None or isinstance(value, int):
        return value
    return value.get(key, value.get("height"))


def image_processing(config: Mapping[str, Any] | None = None, *, image_size: int | None = None) -> ImageProcessing:
    """The :class:`ImageProcessing` of a ``preprocessor_config.json`` dict (transformers' ``CLIPImageProcessor``
    keys; missing keys take its defaults, with ``image_size`` the vision tower's input size)."""
    c = dict(config or {})
    if c.get("do_rescale", True) and not math.isclose(float(c.get("rescale_factor", 1 / 255)), 1 / 255):
        raise ValueError(f"rescale_factor {c['rescale_factor']} is not 1/255; images here are in [0, 1] (uint8 / 255): "
                         "convert the processor's expected range first")
    size = image_size or 224
    edge = _size_of(c.get("size", {"shortest_edge": size}), "shortest_edge") if c.get("do_resize", True) else None
    crop = None
    if c.get("do_center_crop", True):
        cs = c.get("crop_size", {"height": size, "width": size})
        crop = (cs, cs) if isinstance(cs, int) else (int(cs["height"]), int(cs["width"]))
    mean, std = (OPENAI_MEAN, OPENAI_STD) if c.get("do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
    if c.get("do_normalize", True):
        mean, std = tuple(map(float, c.get("image_mean", mean))), tuple(map(float, c.get("image_std", std)))
    return ImageProcessing(None if edge is None else int(edge), crop, mean, std)


# ---- the image side -----------------------------------------------------------------------------------------

@pytree_dataclass
class LatentDecoder:
    """Scaled latents -> images (B, H, W, 3) in [0, 1] through ``models.decode`` (a Stable Diffusion
    :class:`~jaxdiff.pipelines.stable_diffusion.SDModels`: VAE decoder, ``image / 2 + 0.5``, clipped)."""

    models: Any

    def __call__(self, latents: Array) -> Array:
        return self.models.decode(latents)


def pixels_to_unit(x0: Array) -> Array:
    """A pixel model's x0 in [-1, 1] -> images in [0, 1] (clipped, as the images are saved)."""
    return jnp.clip(x0 / 2 + 0.5, 0.0, 1.0)


@pytree_dataclass
class CLIPImageEncoder:
    """``images in [0, 1] -> (image embeddings (B, D), hidden states)`` of a CLIP image tower in transformers'
    layout: ``model`` is a :class:`~jaxdiff.models._pure.PureModel` of a :class:`~jaxdiff.models.clip.CLIPModel`
    or :class:`~jaxdiff.models.clip.CLIPVisionModelWithProjection` (both hold ``vision_model`` and
    ``visual_projection``); ``processing`` prepares the pixels. Embeddings are projected, not normalised."""

    model: Any
    processing: ImageProcessing = ImageProcessing()

    def __call__(self, images: Array) -> tuple[Array, tuple[Array, ...]]:
        module = self.model.module()
        out = module.vision_model(self.processing(images))
        return module.visual_projection(out.pooler_output), tuple(out.hidden_states)


def unit(v: Array) -> Array:
    """``v / ||v||`` over the last axis (transformers' normalisation, no epsilon)."""
    return v / jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True))


def gram(features: Array) -> Array:
    """The Gram matrix ``F^T F / N`` (B, C, C) of token features (B, N, C)."""
    return jnp.einsum("bnc,bnd->bcd", features, features) / features.shape[1]


def default_style_layers(num_layers: int) -> tuple[int, ...]:
    """The first half of a ``num_layers`` encoder's layers, as ``hidden_states`` indices ``1 .. ceil(L/2)``."""
    return tuple(range(1, (num_layers + 1) // 2 + 1))


def style_grams(hidden_states: Sequence[Array], layers: Sequence[int]) -> tuple[Array, ...]:
    """The Gram matrices of the patch tokens (class token dropped) of ``hidden_states[j]`` for ``j`` in ``layers``."""
    n = len(hidden_states)
    for j in layers:
        if not -n <= j < n:
            raise ValueError(f"style layer {j} is out of range: this encoder has hidden states 0..{n - 1} "
                             "(0 = embeddings, j = after layer j)")
    return tuple(gram(hidden_states[j][:, 1:].astype(jnp.float32)) for j in layers)


def style_distance(grams: Sequence[Array], reference: Sequence[Array]) -> Array:
    """``sum_j ||G_j - G'_j||_F^2 / C_j^2`` per sample (B,): the style term of SDG (``-F_S``)."""
    total = 0.0
    for g, r in zip(grams, reference):
        total = total + jnp.mean(jnp.square(g - r), axis=(1, 2))
    return total


def shifted_views(images: Array, shifts: Sequence[tuple[int, int]]) -> tuple[Array, ...]:
    """The images (B, H, W, C) translated by each ``(dy, dx)`` pixel shift, edges replicated (same size).

    Differentiable augmentations before CLIP, as CLIP-guided diffusion's cutouts (Crowson 2021; Nichol et al.
    2022, GLIDE, Sec. 3 note that clean-CLIP gradients on single views are adversarial): the loss averaged over
    jittered views rewards features that survive the jitter rather than pixel-exact adversarial patterns."""
    out = []
    h, w = images.shape[1:3]
    for dy, dx in shifts:
        p = max(abs(dy), abs(dx))
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        out.append(padded[:, p - dy:p - dy + h, p - dx:p - dx + w])
    return tuple(out)


# ---- the loss -----------------------------------------------------------------------------------------------

@pytree_dataclass
class SemanticLoss:
    """``L(x0) = w_T (1 - cos(E_I(x), t)) + w_C (1 - cos(E_I(x), e')) + w_S sum_j ||G_j(x) - G'_j||^2 / C_j^2``
    per sample (B,), with ``x`` the image of ``x0`` (``decoder(x0)``: latents decoded; None: pixels in [-1, 1]).

    ``text`` (1 or B, D) unit text embeddings, ``image`` (1 or B, D) unit reference image embeddings, ``grams``
    the reference's Gram matrices at ``style_layers`` (each (1 or B, C, C)); a term whose reference is None is
    left out (the structure decides, the weights are traced leaves).

    ``contrast`` (M, D), unit embeddings of alternative texts (not in the paper, an option; rows equal to the
    sample's ``text`` are dropped, so the whole class list may be passed): the text term becomes
    CLIP's zero-shot cross-entropy ``-log softmax(temperature [cos(x, t), cos(x, c_1..M)])_0``, which pushes
    away from the alternatives as well as toward ``t`` (CLIP used as a classifier, classifier-guidance style). ``encoder(images) -> (embeddings, hidden
    states)``: a :class:`CLIPImageEncoder` or any pytree callable of that shape. ``cond`` is ignored.
    """

    encoder: Any
    text: Array | None = None
    image: Array | None = None
    grams: tuple | None = None
    decoder: Any = None
    text_weight: Array = 1.0
    content_weight: Array = 1.0
    style_weight: Array = 1.0
    contrast: Array | None = None
    temperature: Array = 100.0
    style_layers: tuple[int, ...] = static_field(default=())
    shifts: tuple[tuple[int, int], ...] = static_field(default=())

    def images(self, x0: Array) -> Array:
        """``x0_hat`` as images in [0, 1]: decoded (latent models) or mapped from [-1, 1] (pixel models)."""
        return pixels_to_unit(x0) if self.decoder is None else self.decoder(x0)

    def terms(self, x0: Array) -> dict[str, Array]:
        """The unweighted terms present, each (B,): ``text`` and ``content`` are ``1 - cos``, ``style`` the distance.
        With ``shifts`` each term is the mean over the shifted views of the image (:func:`shifted_views`)."""
        images = self.images(x0)
        if not self.shifts:
            return self._terms(images)
        views = [self._terms(v) for v in shifted_views(images, self.shifts)]
        return {k: sum(v[k] for v in views) / len(views) for k in views[0]}

    def _terms(self, images: Array) -> dict[str, Array]:
        emb, hidden = self.encoder(images)
        e = unit(emb.astype(jnp.float32))
        out = {}
        if self.text is not None:
            cos = jnp.sum(e * self.text, axis=-1)
            if self.contrast is None:
                out["text"] = 1.0 - cos
            else:  # -log p(text | x) among [text, contrast] by CLIP's zero-shot softmax
                same = self.text @ self.contrast.T > 1.0 - 1e-6  # the target among the alternatives counts once
                others = jnp.where(same, -jnp.inf, e @ self.contrast.T)
                logits = self.temperature * jnp.concatenate([cos[:, None], others], axis=-1)
                out["text"] = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
        if self.image is not None:
            out["content"] = 1.0 - jnp.sum(e * self.image, axis=-1)
        if self.grams is not None:
            out["style"] = style_distance(style_grams(hidden, self.style_layers), self.grams)
        return out

    def __call__(self, x0: Array, cond: Any = None) -> Array:
        t = self.terms(x0)
        weights = {"text": self.text_weight, "content": self.content_weight, "style": self.style_weight}
        return sum(jnp.asarray(weights[k], v.dtype) * v for k, v in t.items())


# ---- references and the guide -------------------------------------------------------------------------------

def _rows(v: Any, name: str) -> Array:
    a = jnp.asarray(v, jnp.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (D,) or (N, D) embeddings, got shape {a.shape}")
    return a


@dataclasses.dataclass(frozen=True)
class Guide:
    """A CLIP ready to guide: embeds reference texts and images on the host and builds SDG transforms.

    ``clip`` is an NNX :class:`~jaxdiff.models.clip.CLIPModel` (text tower needed for text guidance) or a
    :class:`~jaxdiff.models.clip.CLIPVisionModelWithProjection`; ``tokenizer`` its tokenizer (text guidance only);
    ``decoder`` maps the denoiser's x0 to images in [0, 1] (:class:`LatentDecoder` for latent models; None for
    pixel models in [-1, 1]).
    """

    clip: Any
    tokenizer: Any = None
    processing: ImageProcessing = ImageProcessing()
    decoder: Any = None
    max_length: int | None = None

    @property
    def encoder(self) -> CLIPImageEncoder:
        from jaxdiff.models._pure import PureModel

        return CLIPImageEncoder(PureModel.of(self.clip), self.processing)

    @property
    def num_layers(self) -> int:
        cfg = self.clip.config
        return int(getattr(cfg, "vision_config", cfg).num_hidden_layers)

    def text_embeddings(self, texts: str | Sequence[str]) -> Array:
        """Unit text embeddings (N, D) (``get_text_features`` normalised), padded as the tokenizer pads."""
        if self.tokenizer is None or not hasattr(self.clip, "get_text_features"):
            raise ValueError("text guidance needs a CLIPModel with its tokenizer (load_guide(folder) of a CLIPModel "
                             "folder); this guide holds an image tower only")
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.max_length or int(self.clip.config.text_config.max_position_embeddings)
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        return unit(self.clip.get_text_features(jnp.asarray(np.asarray(ids["input_ids"], np.int32))))

    def image_embeddings(self, images: Any) -> tuple[Array, tuple[Array, ...]]:
        """Unit image embeddings (N, D) and the hidden states of reference images (N, H, W, 3) in [0, 1]."""
        x = jnp.asarray(images, jnp.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"reference images must be RGB (N, H, W, 3) in [0, 1], got shape {x.shape}")
        emb, hidden = self.encoder(x)
        return unit(emb), hidden

    @property
    def logit_scale(self) -> float:
        """CLIP's learned softmax temperature ``exp(logit_scale)`` (100 if the model has none)."""
        return float(jnp.exp(self.clip.logit_scale[...])) if hasattr(self.clip, "logit_scale") else 100.0

    def loss(self, *, text: Any = None, image: Any = None, text_weight: float = 1.0, content_weight: float = 1.0,
             style_weight: float = 0.0, style_layers: Sequence[int] | None = None, contrast: Any = None,
             temperature: float | None = None, shifts: Sequence[tuple[int, int]] = ()) -> SemanticLoss:
        """The :class:`SemanticLoss` of reference ``text`` (strings, or embeddings (N, D)) and/or ``image``
        (images (N, H, W, 3) in [0, 1]): content with ``content_weight``, style with ``style_weight`` (> 0 adds
        the Gram term at ``style_layers``, default :func:`default_style_layers`). N is 1 (shared) or the batch.
        ``contrast`` (other texts, or their embeddings) makes the text term CLIP's zero-shot cross-entropy at
        ``temperature`` (default: the model's :attr:`logit_scale`); ``shifts`` averages the loss over translated
        views (:func:`shifted_views`)."""
        if text is None and image is None:
            raise ValueError("semantic guidance needs a reference: pass text=, image= or both")
        t = None
        if text is not None:
            t = self.text_embeddings(text) if _is_text(text) else _rows(text, "text")
        e = grams = None
        layers = tuple(style_layers) if style_layers is not None else default_style_layers(self.num_layers)
        if image is not None:
            e, hidden = self.image_embeddings(image)
            if style_weight:
                grams = style_grams(hidden, layers)
            if not content_weight:
                e = None
        c = None
        if contrast is not None:
            if t is None:
                raise ValueError("contrast= sharpens text guidance: pass text= too")
            c = self.text_embeddings(contrast) if _is_text(contrast) else _rows(contrast, "contrast")
        temp = self.logit_scale if temperature is None else temperature
        return SemanticLoss(self.encoder, t, e, grams, self.decoder, float_leaf(text_weight),
                            float_leaf(content_weight), float_leaf(style_weight), c, float_leaf(temp),
                            layers if grams is not None else (), tuple(tuple(map(int, p)) for p in shifts))

    def guidance(self, scale: Any = 1.0, *, through_denoiser: bool = True, normalize: bool = False,
                 sigma_min: Any = 0.0, sigma_max: Any = math.inf, **references: Any) -> Transform:
        """The SDG denoiser transform (:func:`semantic_guidance`, its options) with the loss of :meth:`loss`
        (keywords ``text``, ``image``, the weights, ``style_layers``, ``contrast``, ``shifts``)."""
        return semantic_guidance(self.loss(**references), scale, through_denoiser=through_denoiser,
                                 normalize=normalize, sigma_min=sigma_min, sigma_max=sigma_max)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and bool(v) and all(isinstance(s, str) for s in v))


@pytree_dataclass
class SemanticGuidance:
    """SDG on x0_hat: ``D'(x) = D(x) - scale sigma^2 grad_x L(D(x))`` (:class:`jaxdiff.guidance.EnergyGuidance`'s
    step), with two options for clean-CLIP guidance:

    - ``normalize``: the gradient is rescaled per sample to a fixed size, ``D' = D - scale sigma g / rms(g)``
      (the x0 shift has RMS ``scale * sigma``, a fraction of the noise level), as CLIP-guided diffusion clamps the
      gradient's magnitude (Disco Diffusion's ``clamp_grad``) and FreeDoM (Yu et al. 2023, eq. 10) sets the step by
      the gradient's norm: every sample and step is pushed equally hard, however flat or steep CLIP is there;
    - ``sigma_min`` / ``sigma_max``: guidance only while ``sigma_min <= sigma <= sigma_max`` (elsewhere ``D``
      unchanged): FreeDoM's and universal guidance's (Bansal et al. 2023) practice of guiding the semantic
      (early / middle) stages, not the last ones where x0_hat is settled and CLIP's gradient is texture.

    ``scale`` (scalar or (B,)), ``sigma_min`` and ``sigma_max`` are traced leaves."""

    inner: Any
    loss_fn: Any
    scale: Array
    sigma_min: Array = 0.0
    sigma_max: Array = math.inf
    through_denoiser: bool = static_field(default=True)
    normalize: bool = static_field(default=False)

    def __post_init__(self) -> None:
        as_leaves(self, floats=("scale", "sigma_min", "sigma_max"))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        x0, grad = loss_gradient(self.inner, self.loss_fn, x, sigma, cond, self.through_denoiser)
        s = expand_to(sigma, x)
        scale = expand_to(jnp.asarray(self.scale).astype(x.dtype), x)
        if self.normalize:
            rms = jnp.sqrt(jnp.mean(jnp.square(grad), axis=tuple(range(1, x.ndim)), keepdims=True))
            shift = scale * s * grad / jnp.maximum(rms, jnp.finfo(x.dtype).tiny)
        else:
            shift = scale * s * s * grad
        inside = (s >= self.sigma_min) & (s <= self.sigma_max)
        return x0 - jnp.where(inside, shift, 0.0)


def semantic_guidance(loss: Callable[[Array, Any], Array], scale: Any = 1.0, *, through_denoiser: bool = True,
                      normalize: bool = False, sigma_min: Any = 0.0, sigma_max: Any = math.inf) -> Transform:
    """SDG as a denoiser transform (:class:`SemanticGuidance`) of a :class:`SemanticLoss` (any
    ``loss(x0, cond) -> (B,)``). ``scale`` 0 returns the inner denoiser's x0 unchanged."""
    params = dict(loss_fn=as_pytree_callable(loss), scale=float_leaf(scale), sigma_min=float_leaf(sigma_min),
                  sigma_max=float_leaf(sigma_max))
    return Transform(SemanticGuidance, params, (("through_denoiser", bool(through_denoiser)),
                                                ("normalize", bool(normalize))))


def load_guide(name_or_folder: str | Path = "digits-clip", *, decoder: Any = None) -> Guide:
    """A :class:`Guide` from a built-in CLIP name (``digits-clip``) or a transformers CLIP folder (``config.json``,
    safetensors weights, tokenizer files, ``preprocessor_config.json``; without one, transformers' defaults at the
    tower's image size)."""
    from jaxdiff import builtin
    from jaxdiff.convert.folders import load_model_folder
    from jaxdiff.models.tokenizers import load_tokenizer

    folder = builtin.builtin_folder(str(name_or_folder)) if str(name_or_folder) in builtin.BUILTIN_ENCODERS \
        else Path(name_or_folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no config.json: give a built-in CLIP name "
                                f"({', '.join(builtin.BUILTIN_ENCODERS)}) or a transformers CLIP folder")
    clip = load_model_folder(folder)
    cfg = clip.config
    size = int(getattr(cfg, "vision_config", cfg).image_size)
    proc_path = folder / "preprocessor_config.json"
    proc = json.loads(proc_path.read_text()) if proc_path.exists() else None
    has_tok = any((folder / f).exists() for f in ("vocab.json", "tokenizer.json"))
    tokenizer = load_tokenizer(folder) if has_tok and hasattr(clip, "get_text_features") else None
    return Guide(clip, tokenizer, image_processing(proc, image_size=size), decoder)
