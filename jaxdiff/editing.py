"""Prompt-to-Prompt image editing as attention controls (Hertz et al. 2022, "Prompt-to-Prompt Image Editing
with Cross Attention Control").

The source prompt and the edited prompt(s) are sampled together, in one batch of one compiled program, from
the same start latents; the edited rows read the source row's attention (Sec. 3.2):

- **word swap** (Sec. 3.2, "Word Swap"): during the first ``cross_steps`` of the run an edited row's
  cross-attention maps are the source's, ``M*_t <- M_t`` (the paper's mapper is the identity when both
  prompts have the same number of tokens; :func:`swap_mapper`);
- **refinement** ("Adding a New Phrase"): target token ``j`` takes the source map of its aligned token
  ``A(j)`` and keeps its own where ``A(j)`` is None (:func:`align_tokens`: global alignment of the token
  sequences, the paper's ``A``);
- **re-weighting** ("Attention Re-weighting"): chosen tokens' maps (of the edited row, i.e. of the source
  after the swap or refinement) times a factor during the same steps;
- **self-attention injection** (Sec. 4, and the paper's code): during the first ``self_steps`` the edited
  rows' self-attention maps are the source's, at grids of at most 16 x 16 query tokens;
- **local blending** (Sec. 3.2, "Local editing"; :class:`LocalBlend`): after each step from the first 20%
  on (the paper's code: ``start_blend``) the edited latents outside a mask keep the source's,
  ``x_t <- x_src + mask (x_edit - x_src)``; the mask comes from the chosen words' cross-attention maps summed
  over the steps so far, averaged over heads and the layers of one grid (the paper's 16 x 16 of a 64 x 64
  latent, or the U-Net's grid nearest it: :func:`blend_resolution`), max-pooled 3 x 3 (k = 1), normalised by
  its maximum and thresholded (0.3), the union of the source's and the edit's; less, as the paper's code's
  ``substruct_words``, the cells where other words' maps (not pooled) exceed a second threshold.

As in the paper's code, only the conditional half of classifier-free guidance is edited, and the maps used
for blending and returned are recorded before the edit. Every number (fractions as step counts, factors,
alignments, threshold, blending on or off) is a traced value, so new prompts and settings reuse the program;
the image size, the blend grid, the number of recorded words and per-step embeddings (instead of a negative
prompt) are part of its shape. The sampler must evaluate the denoiser once per step (DDIM, Euler, DPM++ 2M):
each step's records (for the blend) come out of that one call.

Real images (Mokady et al. 2023, Sec. 4): :func:`edit_image` inverts the image with its caption
(:func:`invert_image`: null-text inversion by default, or plain DDIM inversion), then runs the same program from the
inverted ``z*_T`` (``latents=``, VP scale) with one unconditional embedding per step (``uncond_embeddings=``, shape
(steps, L, D)), by the inversion's own sampler (plain DDIM, no x0 clipping) and guidance scale; its source row is
:func:`jaxdiff.null_text.reconstruct`'s image.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance
from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.conditioning import at_step
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.models import attention_control as ac
from jaxdiff.samplers._base import prepare as _prepare_sampler

Array = jax.Array
SELF_MAX_TOKENS = 16 * 16
"""Self-attention is injected at grids of at most this many query tokens (the paper's code: 16 x 16 on SD)."""
BLEND_THRESHOLD = 0.3
"""The paper's local-blend threshold on the max-normalised map (its code's ``th``: the same for subtracted words)."""
BLEND_START = 0.2
"""The fraction of the steps before local blending begins (the paper's code's ``start_blend``)."""
BLEND_NORMALIZE = ("max", "minmax")  # the paper's m / max; (m - min) / (max - min): see local_blend_mask
MODES = ("auto", "replace", "refine")


# ---- token bookkeeping (host side) -------------------------------------------------------------

def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bare(word: str) -> str:
    return word.strip(string.punctuation).lower()


def word_positions(tokenizer: Any, prompt: str, word: str, max_length: int | None = None) -> list[int]:
    """Token positions (BOS = 0) of every whitespace-separated piece of ``prompt`` equal to ``word``, ignoring
    case and surrounding punctuation ("7," matches "7"); ``[]`` when absent (or truncated away)."""
    positions, at = [], 1
    for piece in prompt.split():
        n = len(_ids(tokenizer, piece))
        bare = piece.strip(string.punctuation)
        if bare and bare.lower() == _bare(word):  # the word's own tokens, not its punctuation's
            lead = len(_ids(tokenizer, piece[: len(piece) - len(piece.lstrip(string.punctuation))]))
            positions.extend(range(at + lead, at + lead + len(_ids(tokenizer, bare))))
        at += n
    return [p for p in positions if max_length is None or p < max_length - 1]


def prompt_tokens(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids with BOS and EOS, no padding."""
    return list(tokenizer(prompt)["input_ids"])


LEFT, UP, DIAG = 1, 2, 3


def align_tokens(source: Sequence[int], target: Sequence[int]) -> list[int | None]:
    """The paper's alignment ``A``: for each target token, its source position, or None for a new token.

    Global (Needleman-Wunsch) alignment with gap 0, match +1, mismatch -1, as the paper's code scores it;
    since a gap never costs more than a mismatch, aligned tokens are always equal (a longest common
    subsequence). Ties prefer a new target token, then a dropped source token, then a match (the code's order).
    """
    n, m = len(source), len(target)
    score = np.zeros((n + 1, m + 1), np.int64)
    move = np.zeros((n + 1, m + 1), np.int64)
    move[0, 1:], move[1:, 0] = LEFT, UP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            best = max(left, up, diag)
            score[i, j] = best
            move[i, j] = LEFT if best == left else UP if best == up else DIAG
    out: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == DIAG:
            i, j = i - 1, j - 1
            out[j] = i
        elif move[i, j] == LEFT:
            j -= 1
        else:
            i -= 1
    return out


def refine_mapper(tokenizer: Any, source: str, target: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(mapper (T,), alphas (T,)): target token ``j`` reads source token ``mapper[j]`` where ``alphas[j]`` is 1
    and keeps its own map where 0; positions after the target's EOS (padding) read the same position."""
    src, tgt = prompt_tokens(tokenizer, source)[:max_length], prompt_tokens(tokenizer, target)[:max_length]
    a = align_tokens(src, tgt)
    mapper, alphas = np.arange(max_length), np.ones(max_length, np.float32)
    for j, i in enumerate(a):
        mapper[j], alphas[j] = (j, 0.0) if i is None else (i, 1.0)
    return mapper.astype(np.int32), alphas


def swap_mapper(tokenizer: Any, source: str, target: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Word swap's mapper for prompts of equal token counts: the identity (every target token reads the source's
    map at its position)."""
    ns, nt = len(prompt_tokens(tokenizer, source)), len(prompt_tokens(tokenizer, target))
    if ns != nt:
        raise ValueError(f"a word swap needs prompts of equal token counts ({ns} vs {nt} tokens: {source!r} -> "
                         f"{target!r}); use mode='refine' for added or removed words")
    return np.arange(max_length, dtype=np.int32), np.ones(max_length, np.float32)


# ---- the controls --------------------------------------------------------------------------------

@pytree_dataclass
class CrossEdit:
    """Prompt-to-Prompt's cross-attention edit of a batch of network rows (Sec. 3.2).

    Row ``b`` becomes ``(alphas_b * P[source_b][..., mapper_b] + (1 - alphas_b) * P[b]) * factors_b`` while its
    steps are active: a word swap is ``mapper`` the identity and ``alphas`` 1, a refinement the alignment's mapper
    and 0/1 alphas, re-weighting ``factors``. Rows with ``source_b = b``, ``alphas_b = 0`` and ``factors_b = 1``
    are left exactly as they were. ``source`` (B,), ``mapper`` (B, T_k) int; ``alphas``, ``factors`` (B, T_k)."""

    source: Array
    mapper: Array
    alphas: Array
    factors: Array
    where: ac.Where = static_field(default=ac.CROSS)
    steps: ac.Steps = dataclasses.field(default_factory=ac.Steps)

    def edit(self, p: Array) -> Array:
        base = jnp.take_along_axis(p[self.source], self.mapper[:, None, None, :], axis=-1)
        a, f = self.alphas[:, None, None, :], self.factors[:, None, None, :]
        return (a * base + (1.0 - a) * p) * f


def local_blend_mask(maps: Array, words: Array, threshold: Any = BLEND_THRESHOLD, size: tuple[int, int] | None = None,
                     k: int = 1, subtract_min: Any = 0.0) -> Array:
    """The paper's LocalBlend mask of every row (P, H, W) from cross-attention maps ``maps`` (P, h, w, T) and the
    chosen words' token indicators ``words`` (P, T): the words' maps summed, max-pooled ``(2k+1)^2`` (stride 1,
    same size), upsampled (nearest) to ``size``, divided by their maximum and thresholded (``> threshold``).
    ``subtract_min`` (traced, 0 or 1): 1 rescales ``(m - min) / (max - min)`` instead (not the paper's: for models
    whose maps follow the object on a near-uniform floor, where ``m / max`` exceeds any threshold everywhere)."""
    m = jnp.einsum("phwt,pt->phw", maps, words)
    m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 2 * k + 1, 2 * k + 1), (1, 1, 1),
                              ((0, 0), (k, k), (k, k)))
    if size is not None and tuple(size) != m.shape[1:]:
        fy, fx = size[0] // m.shape[1], size[1] // m.shape[2]
        m = jnp.repeat(jnp.repeat(m, fy, axis=1), fx, axis=2)
    lo = jnp.asarray(subtract_min, m.dtype) * m.min(axis=(1, 2), keepdims=True)
    m = (m - lo) / (m.max(axis=(1, 2), keepdims=True) - lo)
    return (m > threshold).astype(jnp.float32)


@pytree_dataclass
class LocalBlend:
    """Local blending of the edited rows (1..P-1) with the source row 0: ``x <- x_0 + mask (x - x_0)`` at steps
    ``i >= start``. The mask of row ``b``: the union of the source's and row ``b``'s :func:`local_blend_mask` of
    ``words`` (P, T) 0/1, less the union of their masks of ``subtract_words`` (P, T), made without pooling at
    ``subtract_threshold`` (the paper's code's ``substruct_words`` and ``th[1]``; none when all zero).
    ``threshold``, ``start`` (a step index) traced; ``enabled`` a traced 0/1 (0: no blending); ``subtract_min`` a
    traced 0/1 (1: min-max normalised maps, :func:`local_blend_mask`)."""

    words: Array
    threshold: Array
    enabled: Array
    subtract_min: Array = 0.0
    subtract_words: Any = None
    subtract_threshold: Array = BLEND_THRESHOLD
    start: Array = 0

    def mask(self, maps: Array, size: tuple[int, int]) -> Array:
        m = local_blend_mask(maps, self.words, self.threshold, size, subtract_min=self.subtract_min)
        m = jnp.maximum(m[:1], m)
        if self.subtract_words is None:
            return m
        sub = local_blend_mask(maps, self.subtract_words, self.subtract_threshold, size, k=0,
                               subtract_min=self.subtract_min)
        sub = jnp.where(jnp.any(self.subtract_words > 0), jnp.maximum(sub[:1], sub), 0.0)
        return m * (1.0 - sub)

    def __call__(self, x: Array, maps: Array, step: Array = 0) -> tuple[Array, Array]:
        mask = self.mask(maps, x.shape[1:3])
        on = (self.enabled > 0) & (step >= self.start)
        return jnp.where(on, x[:1] + mask[..., None] * (x - x[:1]), x), jnp.where(on, mask, 1.0)


# ---- the program ---------------------------------------------------------------------------------

class _Sink:
    """Holds the records of the one network call of a loop step while that step is traced (nothing outlives the
    trace: the records leave it as the step's outputs, as :class:`jaxdiff.models.attention_control.ControlRun`)."""

    def __init__(self) -> None:
        self.records: list[dict] = []


@pytree_dataclass
class _EditNet:
    """``net(x_vp, t, cond)`` for the U-Net with ``control``, keeping its records in ``sink``."""

    unet: Any
    control: Any
    sink: Any = static_field()

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        out, rec = self.unet(x, t, cond["context"], control=self.control, return_records=True)
        self.sink.records.append(rec)
        return out


@pytree_dataclass
class EditSettings:
    """The traced inputs of one edit (changing any of them reuses the compiled program)."""

    ids: Array            # (P, L) prompt tokens: the source first
    uncond: Array         # (P, L) negative-prompt tokens, or (S, L, D) per-step unconditional embeddings
    noise: Array          # (1, h, w, c) start latents in the VP scale (standard normal for text-to-image)
    seed: Array           # () uint32: the sampler's key
    scale: Array          # () guidance scale
    cross: CrossEdit
    self_replace: Any     # a Controls of Replace per self-attention grid
    blend: LocalBlend
    record_words: Array   # (P, W, T) token indicators of the words whose maps are returned


def _per_step_uncond(m: Any, s: EditSettings, i: Array, n: int) -> Array:
    if s.uncond.ndim == 3:  # (S, L, D) embeddings, one per step (null-text inversion)
        return jnp.broadcast_to(s.uncond[i][None], (n,) + s.uncond.shape[1:])
    return m.encode_text(s.uncond)


def edit_latents(m: Any, sampler: Any, sigmas: Any, init_sigma: Array, s: EditSettings, threshold: Any = None, *,
                 record_where: ac.Where, quantize: bool = False) -> tuple[Array, Array, Array]:
    """The pure program: (final latents (P, h, w, c) VP scale, recorded maps summed over steps (P, h', w', T),
    last blend mask (P, h, w)). One network batch per step: the P prompts' conditional rows, then their
    unconditional rows; ``sampler`` must call the denoiser once per step (DDIM, Euler, DPM++ 2M, ...)."""
    n = s.ids.shape[0]
    ctx = m.encode_text(s.ids)
    x = jnp.broadcast_to(s.noise, (n,) + s.noise.shape[1:]).astype(jnp.float32) * init_sigma
    sampler = _prepare_sampler(sampler, sigmas)
    key = jax.random.key(s.seed)
    record = ac.Record(record_where)
    cls = jnp.broadcast_to(s.scale, (n,))

    def step(i: Array, carry: tuple) -> tuple:
        x, state, acc, _ = carry
        cross, selfs = at_step((s.cross, s.self_replace), i, 0, sigmas.count)
        sink = _Sink()
        net = _EditNet(m.unet, ac.compose(record, cross, selfs), sink)
        den = DiscreteVPDenoiser(net, m.alphas_cumprod, m.prediction, quantize)
        den = guidance.chain(threshold)(guidance.ClassifierFree(den, cls, {"context": _per_step_uncond(m, s, i, n)}))
        sigma = sigmas.values[i]
        x0 = den(x, sigma, {"context": ctx})
        (rec,) = sink.records
        calls: list = []

        def denoise(x_: Array, s_: Array) -> Array:
            if x_ is not x or calls:
                raise ValueError("Prompt-to-Prompt editing needs a sampler that calls the denoiser once per step, "
                                 "on the current sample (ddim, euler, dpmpp_2m...); choose another --sampler")
            calls.append(1)
            return x0

        x_new, state = sampler.step(denoise, state, x, sigma, sigmas.values[i + 1], jax.random.fold_in(key, i))
        maps = jnp.mean(jnp.stack([r[:n] for r in rec.values()]), axis=0)  # cond rows, mean over layers
        hw = record_where.resolution
        acc = acc + maps.reshape(n, hw[0], hw[1], -1)
        x_new, mask = s.blend(x_new.astype(x.dtype), acc, i)
        return x_new, state, acc, mask

    hw = record_where.resolution
    acc = jnp.zeros((n, hw[0], hw[1], s.ids.shape[1]), jnp.float32)
    mask = jnp.ones((n,) + x.shape[1:3], jnp.float32)
    x, _, acc, mask = jax.lax.fori_loop(0, sigmas.count, step, (x, sampler.init(x), acc, mask))
    final = sigmas.values[sigmas.count]
    return x * jax.lax.rsqrt(1.0 + final * final), acc, mask


def _edit_images(m: Any, sampler: Any, sigmas: Any, init_sigma: Array, s: EditSettings, threshold: Any = None, *,
                 record_where: ac.Where, quantize: bool = False) -> tuple[Array, Array, Array]:
    lat, acc, mask = edit_latents(m, sampler, sigmas, init_sigma, s, threshold, record_where=record_where,
                                  quantize=quantize)
    maps = jnp.einsum("phwt,pkt->pkhw", acc, s.record_words)
    return m.decode(lat), maps / sigmas.count, mask


edit_jit = jax.jit(_edit_images, static_argnames=("record_where", "quantize"))


# ---- host side -----------------------------------------------------------------------------------

@dataclasses.dataclass
class EditResult:
    """``images`` (P, H, W, 3) in [0, 1]: the source first, then the edit(s); ``maps`` {word: (P, h, w)}, the
    words' cross-attention maps averaged over steps, heads and the layers of one grid (recorded before the edit);
    ``mask`` (P, h, w): the last local-blend mask (ones without blending); ``mode`` the edit applied;
    ``inversion`` the real image's :class:`Inversion` (:func:`edit_image`; None for text-to-image)."""

    images: np.ndarray
    maps: dict[str, np.ndarray]
    mask: np.ndarray
    mode: str
    inversion: Any = None

    @property
    def source(self) -> np.ndarray:
        return self.images[0]

    @property
    def edited(self) -> np.ndarray:
        return self.images[1]


def unet_grids(sd: Any, height: int, width: int) -> list[tuple[int, int]]:
    """The query grids of the U-Net's attention layers: the latent grid halved once per block level."""
    levels = len(sd.models.unet.module().config.block_out_channels)
    f = sd.models.vae_factor
    h, w = height // f, width // f
    return [(h >> k, w >> k) for k in range(levels)]


def blend_resolution(sd: Any, height: int, width: int) -> tuple[int, int]:
    """The grid whose cross-attention maps form the blend mask: the U-Net's grid nearest (in scale) the paper's
    16 x 16 (SD's 64 x 64 latent: 16 x 16; digits-sd's 8 x 8 latent: 8 x 8, where a 4 x 4 grid's 3 x 3 max-pool
    would cover nearly all of it)."""
    return min(unet_grids(sd, height, width), key=lambda g: (abs(np.log2(g[0] / 16)), -g[0]))


def _indicator(sd: Any, prompt: str, words: Sequence[str]) -> np.ndarray:
    v = np.zeros(sd.max_length, np.float32)
    for w in words:
        v[word_positions(sd.tokenizer, prompt, w, sd.max_length)] = 1.0
    return v


def edit_settings(sd: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float, cross_steps: float,
                  self_steps: float, mode: str, blend_words: Sequence[str] | None, blend_threshold: Any,
                  reweight: Mapping[str, float] | None, record_words: Sequence[str], negative: str,
                  latents: Any, uncond_embeddings: Any, height: int, width: int,
                  blend_normalize: str = "max", blend_subtract: Sequence[str] | None = None,
                  blend_start: float = BLEND_START) -> tuple[EditSettings, str]:
    """Check the inputs and build the traced :class:`EditSettings` (and the mode applied)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, f in (("cross_steps", cross_steps), ("self_steps", self_steps), ("blend_start", blend_start)):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} is a fraction of the steps in [0, 1], got {f}")
    n, L = len(prompts), sd.max_length
    src = prompts[0]
    if mode == "auto":
        same = all(len(prompt_tokens(sd.tokenizer, p)) == len(prompt_tokens(sd.tokenizer, src)) for p in prompts)
        mode = "replace" if same else "refine"
    source = np.concatenate([np.zeros(n, np.int32), np.arange(n, 2 * n, dtype=np.int32)])  # cond rows read row 0
    mapper = np.tile(np.arange(L, dtype=np.int32), (2 * n, 1))
    alphas = np.zeros((2 * n, L), np.float32)
    factors = np.ones((2 * n, L), np.float32)
    for b, p in enumerate(prompts[1:], start=1):
        mapper[b], alphas[b] = (swap_mapper if mode == "replace" else refine_mapper)(sd.tokenizer, src, p, L)
        for word, f in dict(reweight or {}).items():
            pos = word_positions(sd.tokenizer, p, word, L)
            if not pos:
                raise ValueError(f"re-weighted word {word!r} is not in the target prompt {p!r}")
            factors[b, pos] = float(f)
    cross = CrossEdit(jnp.asarray(source), jnp.asarray(mapper), jnp.asarray(alphas), jnp.asarray(factors),
                      steps=ac.Steps(0, int(cross_steps * steps)))
    rows = jnp.asarray(np.concatenate([np.zeros(n, np.int32), np.arange(n, 2 * n, dtype=np.int32)]))
    selfs = ac.compose(*[ac.Replace(rows, ac.Where(kind="self", resolution=g), ac.Steps(0, int(self_steps * steps)))
                         for g in unet_grids(sd, height, width) if g[0] * g[1] <= SELF_MAX_TOKENS])
    words = np.zeros((n, L), np.float32)
    if blend_words:
        words = np.stack([_indicator(sd, p, blend_words) for p in prompts])
        for p, row in zip(prompts, words):
            if not row.any():
                raise ValueError(f"none of the blend words {list(blend_words)} is in the prompt {p!r}; "
                                 "give the source's word and the target's (e.g. --blend 'red blue')")
    if blend_subtract and not blend_words:
        raise ValueError("blend_subtract removes cells from the local-blend mask: give blend_words too")
    sub = np.stack([_indicator(sd, p, blend_subtract) for p in prompts]) if blend_subtract else words * 0
    if blend_subtract and not sub.any():
        raise ValueError(f"none of the subtracted words {list(blend_subtract)} is in the prompts {list(prompts)}")
    if blend_normalize not in BLEND_NORMALIZE:
        raise ValueError(f"blend_normalize must be one of {', '.join(BLEND_NORMALIZE)}, got {blend_normalize!r}")
    th = np.asarray(blend_threshold, np.float32).ravel()
    if th.size not in (1, 2):
        raise ValueError(f"blend_threshold is one number or two (the blend words', the subtracted words'), "
                         f"got {blend_threshold!r}")
    th = np.resize(th, 2)  # one number serves both, as the paper's code's th = (0.3, 0.3)
    blend = LocalBlend(jnp.asarray(words), jnp.asarray(th[0]), jnp.asarray(1.0 if blend_words else 0.0, jnp.float32),
                       jnp.asarray(float(blend_normalize == "minmax"), jnp.float32), jnp.asarray(sub),
                       jnp.asarray(th[1]), jnp.asarray(int(blend_start * steps), jnp.int32))
    rec = np.stack([[_indicator(sd, p, [w]) for w in record_words] for p in prompts]) if record_words else \
        np.zeros((n, 0, L), np.float32)
    f = sd.models.vae_factor
    shape = (1, height // f, width // f, sd.models.latent_channels)
    if latents is None:
        from jaxdiff.pipelines.stable_diffusion import noise_for_seed

        noise = noise_for_seed(jnp.uint32(seed), shape)
    else:
        arr = np.asarray(latents, np.float32)
        if arr.shape not in (shape, shape[1:]):
            raise ValueError(f"latents must be x_T of shape (h, w, c) or (1, h, w, c) = {shape} (NHWC, VP scale), "
                             f"got {arr.shape}")
        noise = jnp.asarray(arr.reshape(shape))
    if uncond_embeddings is None:
        uncond = jnp.asarray(sd.tokenize([negative] * n))
    else:
        uncond = jnp.asarray(uncond_embeddings, jnp.float32)
        if uncond.ndim != 3 or uncond.shape[0] != steps:
            raise ValueError(f"uncond_embeddings must be (steps, L, D) = ({steps}, L, D), one per step, "
                             f"got {tuple(uncond.shape)}")
    s = EditSettings(jnp.asarray(sd.tokenize(list(prompts))), uncond, noise, jnp.asarray(seed, jnp.uint32),
                     jnp.asarray(guidance, jnp.float32), cross, selfs, blend, jnp.asarray(rec))
    return s, mode


def edit(sd: Any, source_prompt: str, target_prompt: str | Sequence[str], *, seed: int = 0, steps: int = 20,
         guidance: float = 7.5, cross_steps: float = 0.8, self_steps: float = 0.4, mode: str = "auto",
         blend_words: Sequence[str] | str | None = None,
         blend_threshold: float | tuple[float, float] = BLEND_THRESHOLD, blend_normalize: str = "max",
         reweight: Mapping[str, float] | None = None,
         record_words: Sequence[str] | str | None = None, negative: str = "", latents: Any = None,
         uncond_embeddings: Any = None, sampler: str | None = None, schedule: str | None = None,
         height: int | None = None, width: int | None = None,
         blend_grid: int | tuple[int, int] | None = None, blend_composite: bool = False,
         blend_subtract: Sequence[str] | str | None = None, blend_start: float = BLEND_START) -> EditResult:
    """Prompt-to-Prompt: the source prompt's image and its edit(s), sampled together in one compiled program.

    ``mode``: ``"replace"`` (word swap, prompts of equal token counts), ``"refine"`` (added words, the paper's
    alignment) or ``"auto"`` (replace when the token counts agree). ``cross_steps`` / ``self_steps``: the fraction
    of the first steps with cross- / self-attention injection. ``blend_words``: words whose maps (in whichever
    prompt holds them) form the local-blend mask (``blend_threshold``, default the paper's 0.3; ``blend_normalize``
    ``"max"`` the paper's ``m / max`` or ``"minmax"``, :func:`local_blend_mask`; ``blend_grid``
    the grid of the maps, default :func:`blend_resolution`; ``blend_composite``: :func:`composite` the decoded
    edits onto the source's pixels outside the last mask); ``blend_subtract``: words whose maps (not pooled) take
    cells out of it where they exceed the second of two ``blend_threshold`` values (the paper's code's
    ``substruct_words``, ``th``); blending begins after the first ``blend_start`` of the steps (its code's 0.2).
    ``reweight`` {word: factor} scales the target tokens' maps during the cross-attention steps. ``record_words``:
    words whose maps :class:`EditResult` returns (default: the blend and re-weighted words). ``latents``: the start
    x_T in the VP scale (standard normal for text-to-image; an inverted image's x_T for a real image);
    ``uncond_embeddings`` (steps, L, D): one unconditional embedding per step (null-text inversion) instead of the
    negative prompt's. ``sampler`` must evaluate the denoiser once per step (default: the folder's scheduler)."""
    return _edit_on_plan(sd, sd.plan(steps, sampler, schedule), source_prompt, target_prompt, seed=seed, steps=steps,
                         guidance=guidance, cross_steps=cross_steps, self_steps=self_steps, mode=mode,
                         blend_words=blend_words, blend_threshold=blend_threshold, blend_normalize=blend_normalize,
                         reweight=reweight, record_words=record_words, negative=negative, latents=latents,
                         uncond_embeddings=uncond_embeddings, height=height, width=width, blend_grid=blend_grid,
                         blend_composite=blend_composite, blend_subtract=blend_subtract, blend_start=blend_start)


def composite(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The edited rows' pixels inside the blend mask over the source row's (``images[0]``) elsewhere.

    Local blending keeps the *latents* outside the mask, but a latent model's decoder is not local (GroupNorm
    statistics and attention over the whole image), so the decoded background moves with the edit. Pasting in
    pixel space afterwards, as diffusers' inpainting overlay does, keeps it exactly. ``mask`` (P, h, w) at latent
    size is upsampled by nearest neighbour; the source row is returned unchanged."""
    fy, fx = images.shape[1] // mask.shape[1], images.shape[2] // mask.shape[2]
    inside = np.repeat(np.repeat(mask > 0, fy, 1), fx, 2)[..., None]
    inside[0] = True
    return np.where(inside, images, images[:1])


def _edit_on_plan(sd: Any, plan: Any, source_prompt: str, target_prompt: str | Sequence[str], *, seed: int,
                  steps: int, guidance: float, cross_steps: float, self_steps: float, mode: str, blend_words: Any,
                  blend_threshold: Any, blend_normalize: str, reweight: Any, record_words: Any, negative: str,
                  latents: Any, uncond_embeddings: Any, height: int | None, width: int | None,
                  blend_grid: Any, blend_composite: bool = False, blend_subtract: Any = None,
                  blend_start: float = BLEND_START) -> EditResult:
    """:func:`edit` on a given sampling plan (:func:`edit_image` runs it on null-text inversion's plain DDIM)."""
    targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
    if not targets:
        raise ValueError("give a target prompt")
    blend_words = blend_words.split() if isinstance(blend_words, str) else blend_words
    blend_subtract = blend_subtract.split() if isinstance(blend_subtract, str) else blend_subtract
    if blend_composite and not blend_words:
        raise ValueError("blend_composite pastes the edit inside the local-blend mask: give blend_words too")
    record_words = record_words.split() if isinstance(record_words, str) else record_words
    if record_words is None:
        record_words = list(dict.fromkeys([*(blend_words or []), *dict(reweight or {})]))
    height = height or sd.default_size
    width = width or sd.default_size
    grid = blend_grid if blend_grid is not None else blend_resolution(sd, height, width)
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if grid not in unet_grids(sd, height, width):
        raise ValueError(f"blend_grid {grid} is not a grid of the U-Net's attention; choose one of "
                         f"{unet_grids(sd, height, width)}")
    s, mode = edit_settings(sd, [source_prompt, *targets], seed=seed, steps=steps, guidance=guidance,
                            cross_steps=cross_steps, self_steps=self_steps, mode=mode, blend_words=blend_words,
                            blend_threshold=blend_threshold, blend_normalize=blend_normalize, reweight=reweight,
                            record_words=record_words, negative=negative, latents=latents,
                            uncond_embeddings=uncond_embeddings, height=height, width=width,
                            blend_subtract=blend_subtract, blend_start=blend_start)
    images, maps, mask = edit_jit(sd.models, plan.sampler, plan.sigmas, jnp.asarray(plan.init_sigma, jnp.float32), s,
                                  plan.threshold, record_where=ac.Where(kind="cross", resolution=grid),
                                  quantize=plan.quantize)
    images = np.asarray(images)
    if not np.all(np.isfinite(images)):
        raise FloatingPointError("editing produced NaN/Inf; try a lower guidance scale")
    maps, mask = np.asarray(maps), np.asarray(mask)
    if blend_composite:
        images = composite(images, mask)
    return EditResult(images, {w: maps[:, k] for k, w in enumerate(record_words)}, mask, mode)


# ---- real images (Mokady et al. 2023, Sec. 4: null-text inversion, then Prompt-to-Prompt) ----------------------

INVERSIONS = ("null-text", "ddim")


@dataclasses.dataclass
class Inversion:
    """Real image(s) inverted for editing by plain DDIM (eta 0, no x0 clipping: :func:`jaxdiff.null_text.ddim_plan`).

    ``latents`` (B, h, w, c): ``z*_T`` in the VP scale (diffusers' ``latents=``; :func:`edit`'s ``latents=``, which
    the DDIM plan multiplies by ``init_sigma = sqrt(1 + sigma_max^2)``, as the recipe and
    :func:`jaxdiff.null_text.reconstruct` do); ``uncond`` (B, S, L, D): the unconditional embedding of each of the S
    sampling steps (null-text inversion's optimised ones; for plain DDIM inversion the empty prompt's, repeated);
    ``method`` one of :data:`INVERSIONS`; ``guidance`` the scale they were made for; ``null_text`` the
    :class:`jaxdiff.null_text.NullTextInversion` (losses, pivot) or None."""

    latents: np.ndarray
    uncond: np.ndarray
    method: str
    guidance: float
    null_text: Any = None

    @property
    def steps(self) -> int:
        return int(self.uncond.shape[1])

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, i: int) -> "Inversion":
        """Image ``i`` alone (a batch of one)."""
        nt = None if self.null_text is None else jax.tree_util.tree_map(lambda a: a[i: i + 1], self.null_text)
        return Inversion(self.latents[i: i + 1], self.uncond[i: i + 1], self.method, self.guidance, nt)


def invert_image(sd: Any, image: Any, prompt: str | Sequence[str], *, steps: int = 50, guidance: float = 7.5,
                 inversion: str = "null-text", options: Any = None) -> Inversion:
    """Invert real image(s) (PIL, or arrays (H, W, 3) / (B, H, W, 3) in [0, 1]) with their caption(s) for editing.

    ``"null-text"``: :func:`jaxdiff.null_text.invert` (the pivot by DDIM inversion at guidance 1, then one
    unconditional embedding per step optimised so that DDIM at ``guidance`` retraces it; ``options`` a
    :class:`jaxdiff.null_text.NullTextOptions`); ``"ddim"``: plain DDIM inversion
    (:func:`jaxdiff.null_text.ddim_invert`), the empty prompt's embedding at every step."""
    from jaxdiff import null_text as nt

    if inversion not in INVERSIONS:
        raise ValueError(f"inversion must be one of {', '.join(INVERSIONS)}, got {inversion!r}")
    if inversion == "ddim":
        if options is not None:
            raise ValueError("options (NullTextOptions) apply to inversion='null-text' only")
        latents = np.asarray(nt.ddim_invert(sd, image, prompt, steps=steps))
        empty = np.asarray(sd.encode_prompt([""]), np.float32)[0]
        uncond = np.broadcast_to(empty, (latents.shape[0], steps) + empty.shape).copy()
        return Inversion(latents, uncond, inversion, float(guidance))
    inv = nt.invert(sd, image, prompt, steps=steps, guidance=guidance, options=options)
    return Inversion(np.asarray(inv.latents), np.asarray(inv.uncond), inversion, float(guidance), inv)


def edit_image(sd: Any, image: Any, source_prompt: str, target_prompt: str | Sequence[str], *,
               steps: int | None = None, guidance: float | None = None, inversion: str = "null-text",
               inversion_options: Any = None, inverted: Inversion | None = None, cross_steps: float = 0.8,
               self_steps: float = 0.4, mode: str = "auto", blend_words: Sequence[str] | str | None = None,
               blend_threshold: float | tuple[float, float] = BLEND_THRESHOLD, blend_normalize: str = "max",
               reweight: Mapping[str, float] | None = None, record_words: Sequence[str] | str | None = None,
               blend_grid: int | tuple[int, int] | None = None, blend_composite: bool = False,
               blend_subtract: Sequence[str] | str | None = None, blend_start: float = BLEND_START) -> EditResult:
    """Prompt-to-Prompt on a real image (Mokady et al. 2023, Sec. 4): invert it with its caption
    ``source_prompt`` (:func:`invert_image`, null-text inversion by default; or pass ``inverted``, one image's
    :class:`Inversion`, and no ``image``), then :func:`edit` from its ``z*_T`` with its per-step unconditional
    embeddings, by the inversion's own sampler (plain DDIM, no x0 clipping) and guidance scale.

    Row 0 (the source) is the inversion's reconstruction, :func:`jaxdiff.null_text.reconstruct` of the same
    latents and embeddings; the edited rows read its attention as in :func:`edit` (same edit options). ``steps``
    and ``guidance`` default to 50 and 7.5, or to ``inverted``'s; the edit must use the steps it was inverted with
    (one embedding per step) and, after null-text inversion, its guidance scale. The result's ``inversion`` holds
    the :class:`Inversion` (reuse it for other edits of the same image)."""
    if (image is None) == (inverted is None):
        raise ValueError("give the real image, or its inversion (inverted=), not both")
    if inverted is None:
        inverted = invert_image(sd, image, source_prompt, steps=50 if steps is None else steps,
                                guidance=7.5 if guidance is None else guidance, inversion=inversion,
                                options=inversion_options)
    if len(inverted) != 1:
        raise ValueError(f"edit_image edits one image; got an inversion of {len(inverted)}: pass inverted[i]")
    steps = inverted.steps if steps is None else int(steps)
    guidance = inverted.guidance if guidance is None else float(guidance)
    if steps != inverted.steps:
        raise ValueError(f"the image was inverted with {inverted.steps} steps (one embedding per step) but steps="
                         f"{steps}; edit with steps={inverted.steps} or invert again")
    if inverted.method == "null-text" and guidance != inverted.guidance:
        raise ValueError(f"the null-text embeddings were optimised for guidance {inverted.guidance:g}, not "
                         f"{guidance:g}; edit at the same scale or invert again")
    from jaxdiff import null_text as nt

    f = sd.models.vae_factor
    h, w = inverted.latents.shape[1:3]
    r = _edit_on_plan(sd, nt.ddim_plan(sd, steps), source_prompt, target_prompt, seed=0, steps=steps,
                      guidance=guidance, cross_steps=cross_steps, self_steps=self_steps, mode=mode,
                      blend_words=blend_words, blend_threshold=blend_threshold, blend_normalize=blend_normalize,
                      reweight=reweight, record_words=record_words, negative="", latents=inverted.latents[0],
                      uncond_embeddings=inverted.uncond[0], height=h * f, width=w * f, blend_grid=blend_grid,
                      blend_composite=blend_composite, blend_subtract=blend_subtract, blend_start=blend_start)
    return dataclasses.replace(r, inversion=inverted)


def maps_grid(result: EditResult, size: int | None = None) -> np.ndarray:
    """The recorded maps as one image: a row per prompt (the source first), its image then one map per word
    (each scaled to its maximum, upsampled nearest to the image size), for ``jaxdiff edit --attention-maps``."""
    from jaxdiff.images import grid

    h, w = result.images.shape[1:3] if size is None else (size, size)
    cells = []
    for p, image in enumerate(result.images):
        cells.append(image)
        for m in result.maps.values():
            m = np.asarray(m[p], np.float32)
            m = m / m.max() if m.max() > 0 else m
            m = np.repeat(np.repeat(m, h // m.shape[0], 0), w // m.shape[1], 1)
            cells.append(np.repeat(m[..., None], 3, -1))
    return grid(np.stack(cells), cols=1 + len(result.maps), pad=1)
