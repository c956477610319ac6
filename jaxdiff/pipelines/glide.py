"""GLIDE sampling (Nichol et al. 2022): the 64x64 text-conditional base and the 64 -> 256 upsampler in one program.

What glide-text2im's notebook does, in jaxdiff's terms:

- **schedules**: 1000 training steps, ``squaredcos_cap_v2`` for the base and openai's ``linear`` for the
  upsampler (:func:`glide_alphas_cumprod`); sampling on a *respaced* subset of them (openai's
  ``space_timesteps``: ``"100"``, ``"fast27"``, ``"10,10,3,2,2"``, ``"ddim50"``), which in sigma space is
  simply the training sigmas at those steps (:func:`respaced_sigmas`): a DDPM step between two of them is the
  respaced process's step, the network seeing the original step index (``quantize``).
- **prompts**: lower-cased text, GPT-2 byte-pair encoded (:mod:`jaxdiff.models.gpt2_tokenizer`; jaxdiff ships
  the vocabulary), padded to ``text_ctx`` with the end token and a mask (``padded_tokens_and_mask``); the
  unconditional half is the empty prompt (:func:`prompt_tokens`, :func:`text_conditions`). Token ids work too.
- **base**: ancestral sampling with the network's variance (``DDPM(variance="learned_range")``,
  ``DiscreteVPDenoiser(learned_variance=True)``), classifier-free guidance of the *mean* only (the variance
  channels come from the conditional half, :class:`jaxdiff.guidance.ClassifierFree`) against the empty prompt,
  and ``clip_denoised`` (x0 clipped to [-1, 1]).
- **upsampler**: the base output quantised to 8 bits, bilinearly upsampled (``align_corners=False``) and
  concatenated to the input; deterministic DDIM on ``fast27`` from start noise scaled by ``upsample_temp``
  (0.997), x0 clipped.

:func:`glide_cascade` chains the stages with :func:`jaxdiff.pipelines.cascade.cascade` (the upsampler's start-noise
temperature and the quantisation between them are fields of its stage); everything numeric (prompts, guidance, step counts, temperature, weights) is a
traced leaf, so :data:`glide_cascade_jit` compiles once per pair of stage structures.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance as G
from jaxdiff import schedules
from jaxdiff._pytree import replace
from jaxdiff._transforms import Transform
from jaxdiff.denoisers import DiscreteVPDenoiser, DropVariance
from jaxdiff.pipelines import cascade
from jaxdiff.samplers import DDIM, DDPM

Array = jax.Array
TRAIN_STEPS = 1000
END_TOKEN = 50256          # GLIDE's GPT-2 byte-pair encoder pads with its end token
UPSAMPLE_TEMP = 0.997      # glide-text2im's text2im notebook


# ---- schedules -------------------------------------------------------------------------------

def glide_betas(name: str, steps: int = TRAIN_STEPS) -> np.ndarray:
    """openai's named beta schedules (float64): ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, eq. 17,
    ``abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2`` discretised, betas capped at 0.999) and ``linear``
    (Ho et al. 2020's 1e-4 .. 0.02, scaled by ``1000 / steps``)."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)])
    raise ValueError(f"unknown GLIDE noise schedule {name!r}; valid: 'squaredcos_cap_v2', 'linear'")


def glide_alphas_cumprod(name: str, steps: int = TRAIN_STEPS) -> np.ndarray:
    """``abar_t`` of :func:`glide_betas`, accumulated in float64 as openai does, returned as float32."""
    return np.cumprod(1.0 - glide_betas(name, steps)).astype(np.float32)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """openai's respacing: the training steps kept, ascending. ``section_counts`` splits the steps into equal
    sections and takes that many evenly spaced (rounded) steps from each (``"100"``; ``"10,10,3,2,2"``);
    ``"fast27"`` is the latter with step ``T - 1`` replaced by ``T - 3``; ``"ddimN"`` the integer stride giving
    exactly N steps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride")
        if section_counts == "fast27":
            steps = set(space_timesteps(num_timesteps, "10,10,3,2,2"))
            steps.discard(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return sorted(steps)
        section_counts = [int(v) for v in section_counts.split(",")]
    size, extra = divmod(num_timesteps, len(section_counts))
    start, taken = 0, []
    for i, count in enumerate(section_counts):
        n = size + (1 if i < extra else 0)
        if n < count:
            raise ValueError(f"cannot divide a section of {n} steps into {count}")
        stride = 1.0 if count <= 1 else (n - 1) / (count - 1)
        taken += [start + round(j * stride) for j in range(count)]
        start += n
    return sorted(set(taken))


def respaced_sigmas(alphas_cumprod: Any, respacing: str | Sequence[int], *,
                    capacity: int = schedules.DEFAULT_CAPACITY) -> schedules.Sigmas:
    """The training sigmas ``sqrt((1 - abar_t) / abar_t)`` at the respaced steps, decreasing, then 0."""
    ac = np.asarray(alphas_cumprod, np.float64)
    steps = space_timesteps(len(ac), respacing)[::-1]
    levels = schedules.vp_sigmas(ac[steps])
    return schedules.from_array(np.append(levels, 0.0), capacity=capacity)


# ---- prompts ---------------------------------------------------------------------------------

def pad_tokens(ids: Sequence[int], text_ctx: int = 128, end_token: int = END_TOKEN) -> tuple[np.ndarray, np.ndarray]:
    """openai's ``padded_tokens_and_mask``: the first ``text_ctx`` ids padded with ``end_token``, and the mask
    (True on the ids). ``[]`` is the empty prompt of classifier-free guidance."""
    ids = list(ids)[:text_ctx]
    pad = text_ctx - len(ids)
    return (np.asarray(ids + [end_token] * pad, np.int32), np.asarray([True] * len(ids) + [False] * pad))


def prompt_tokens(prompt: str | Sequence[str] | Sequence[int], text_ctx: int = 128, batch: int = 1,
                  tokenizer: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """GLIDE's tokens ``(batch, text_ctx)`` int32 and mask (bool) for a prompt: text is lower-cased and GPT-2
    byte-pair encoded as glide-text2im's tokenizer does (``tokenizer``: default the GPT-2 vocabulary jaxdiff ships,
    :func:`jaxdiff.models.gpt2_tokenizer.gpt2_tokenizer`), token ids are taken as they are; both padded as
    ``padded_tokens_and_mask`` (:func:`pad_tokens`). A list of strings gives one row each; ``""`` or ``[]`` is
    the empty prompt of the unconditional half."""
    if isinstance(prompt, str):
        rows: list[Any] = [prompt] * batch
    elif len(prompt) and all(isinstance(p, str) for p in prompt):
        if batch not in (1, len(prompt)):
            raise ValueError(f"{len(prompt)} prompts but batch={batch}; pass one prompt per row or one prompt")
        rows = list(prompt)
    elif all(isinstance(p, (int, np.integer)) for p in prompt):
        rows = [list(prompt)] * batch
    else:
        raise TypeError("prompt must be a str, a list of str (one a row) or a list of token ids")
    if any(isinstance(r, str) for r in rows) and tokenizer is None:
        from jaxdiff.models.gpt2_tokenizer import gpt2_tokenizer
        tokenizer = gpt2_tokenizer()
    end = END_TOKEN if tokenizer is None else tokenizer.end_token
    padded = [pad_tokens(tokenizer.glide_encode(r) if isinstance(r, str) else r, text_ctx, end) for r in rows]
    return np.stack([t for t, _ in padded]), np.stack([m for _, m in padded])


_encode_jit = jax.jit(lambda net, tokens, mask: net.bind("encode")(tokens, mask))


def text_conditions(network: Any, prompt: str | Sequence[str] | Sequence[int], batch: int = 1, *,
                    tokenizer: Any = None) -> tuple[dict[str, Array], dict[str, Array]]:
    """``(text, uncond_text)`` for :func:`base_stage` / :func:`upsampler_stage`: the GLIDE network's text encoder
    (``GlideUNet.encode``, as a :class:`jaxdiff.models._pure.PureModel`) on the prompt's tokens
    (:func:`prompt_tokens`) and on the empty prompt, ``batch`` rows each, as glide-text2im's notebook builds the
    conditional and unconditional halves. One compiled encoder for every prompt."""
    config = network.module().config
    tokens, mask = prompt_tokens(prompt, config.text_ctx, batch, tokenizer)
    if int(tokens.max()) >= config.n_vocab:
        raise ValueError(f"token id {int(tokens.max())} is outside the network's vocabulary "
                         f"(n_vocab={config.n_vocab}); GLIDE's released networks read GPT-2 ids (n_vocab=50257)")
    empty, empty_mask = prompt_tokens([], config.text_ctx, tokens.shape[0], tokenizer)
    return (_encode_jit(network, jnp.asarray(tokens), jnp.asarray(mask)),
            _encode_jit(network, jnp.asarray(empty), jnp.asarray(empty_mask)))


# ---- stages ----------------------------------------------------------------------------------

def glide_denoiser(alphas_cumprod: Any) -> Transform:
    """The denoiser factory of a GLIDE stage: epsilon prediction with learned variance, the network reading the
    integer training step (``DiscreteVPDenoiser(..., quantize=True, learned_variance=True)``)."""
    return Transform(DiscreteVPDenoiser, dict(alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32)),
                     (("prediction", "epsilon"), ("quantize", True), ("learned_variance", True)))


def base_stage(network: Any, text: Any, uncond_text: Any, *, guidance: Any = 3.0, respacing: str = "100",
               alphas_cumprod: Any = None, shape: tuple[int, ...] = (64, 64, 3), clip: bool = True,
               transform: Any = None) -> cascade.Stage:
    """GLIDE's base stage: ``network(x, t, cond)`` with ``cond = text`` (e.g. ``GlideUNet.encode`` of the prompt's
    tokens), classifier-free guidance against ``uncond_text`` applied to the mean (the variance from the
    conditional half), x0 clipped, ``DDPM(variance="learned_range")`` on the respaced cosine schedule.
    ``transform``: further denoiser transforms after guidance (e.g. :func:`jaxdiff.clip_guidance.clip_guidance`)."""
    ac = glide_alphas_cumprod("squaredcos_cap_v2") if alphas_cumprod is None else alphas_cumprod
    guide = G.chain(G.classifier_free(guidance, uncond_text), G.static_threshold(-1.0, 1.0) if clip else None,
                    transform)
    return cascade.Stage(network=network, sampler=DDPM(variance="learned_range"), sigmas=respaced_sigmas(ac, respacing),
                         shape=tuple(shape), denoiser=glide_denoiser(ac), transform=guide, cond=text, sigma_data=1.0)


def upsampler_stage(network: Any, text: Any, *, respacing: str = "fast27", alphas_cumprod: Any = None,
                    shape: tuple[int, ...] = (256, 256, 3), clip: bool = True, transform: Any = None) -> cascade.Stage:
    """GLIDE's upsampler stage: the previous output bilinearly upsampled as 3 extra input channels (no noise
    augmentation, no level) after 8-bit rounding (:func:`quantize_uint8`), the text ``text``, DDIM (eta 0) on the respaced linear schedule, x0 clipped; the
    variance channels are dropped for DDIM."""
    ac = glide_alphas_cumprod("linear") if alphas_cumprod is None else alphas_cumprod
    guide = G.chain(G.static_threshold(-1.0, 1.0) if clip else None, Transform(DropVariance, {}), transform)
    return cascade.Stage(network=network, sampler=DDIM(), sigmas=respaced_sigmas(ac, respacing), shape=tuple(shape),
                         denoiser=glide_denoiser(ac), transform=guide, cond=text, upsample="linear", augment=0.0,
                         level_key=None, sigma_data=1.0, previous_transform=quantize_uint8)


def quantize_uint8(x: Array) -> Array:
    """``round((x + 1) * 127.5) / 127.5 - 1`` after clipping to [-1, 1]: the 8-bit image the upsampler was
    given in glide-text2im's notebook."""
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def glide_cascade(base: cascade.Stage, upsampler: cascade.Stage | None, key: Array, batch: int,
                  upsample_temp: Any = UPSAMPLE_TEMP) -> tuple[Array, ...]:
    """:func:`jaxdiff.pipelines.cascade.cascade` of the base samples and (given an upsampler) their upsampling from
    start noise scaled by ``upsample_temp`` (traced)."""
    if upsampler is None:
        return cascade.cascade([base], key, batch)
    return cascade.cascade([base, replace(upsampler, noise_scale=upsample_temp)], key, batch)


glide_cascade_jit = jax.jit(glide_cascade, static_argnames=("batch",))
"""``glide_cascade_jit(base, upsampler, key, batch, upsample_temp)``: one program per pair of stage structures."""
