"""Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using Guided Diffusion
Models") for Stable Diffusion recipes: reconstruct a *real* image under classifier-free guidance, then edit it.

Notation of the paper (Sec. 3; VP latents ``z_t``, ``alpha_t`` = ``alphas_cumprod`` at step t, prompt embedding
``C = psi(P)``, null-text embedding ``psi("")``):

- Classifier-free guidance (Sec. 3, eq. 2): ``eps~(z_t, t, C, phi) = w eps(z_t, t, C) + (1 - w) eps(z_t, t, phi)``,
  with ``phi = psi("")`` normally and ``w = 7.5``.
- DDIM sampling (eta = 0): ``z_{t-1} = sqrt(alpha_{t-1} / alpha_t) z_t
  + sqrt(alpha_{t-1}) (sqrt(1/alpha_{t-1} - 1) - sqrt(1/alpha_t - 1)) eps~``;
  DDIM inversion (Sec. 3.1) runs the same move upward, ``z_{t+1} = sqrt(alpha_{t+1} / alpha_t) z_t
  + sqrt(alpha_{t+1}) (sqrt(1/alpha_{t+1} - 1) - sqrt(1/alpha_t - 1)) eps(z_t, t, C)``, at ``w = 1``.
- Pivotal inversion (Sec. 3.2): DDIM inversion at ``w = 1`` of the image latent ``z*_0`` gives the pivot
  trajectory ``z*_0 .. z*_T``. Sampling from ``z*_T`` at ``w = 1`` retraces it closely; at ``w > 1`` it drifts.
- Null-text optimisation (Sec. 3.3, eq. 3, Algorithm 1): with ``z_bar_T = z*_T`` and ``phi_T = psi("")``, for
  ``t = T .. 1`` minimise ``|| z*_{t-1} - z_{t-1}(z_bar_t, phi_t, C) ||_2^2`` over ``phi_t`` alone (N steps of
  Adam; the model, ``C`` and ``z_bar_t`` frozen), then ``z_bar_{t-1} = z_{t-1}(z_bar_t, phi_t, C)`` and
  ``phi_{t-1}`` starts from ``phi_t``. Sampling from ``z_bar_T`` with ``phi_t`` at step t reproduces the image.

Reference behaviour (the authors' ``null_text_w_ptp`` notebook), followed here: DDIM inversion evaluates the
network at the *next* (higher) timestep on the current latent (``jaxdiff.sampling.invert``'s
``evaluate_at="target"``); the image latent is the VAE posterior mean; a fresh Adam (betas 0.9 / 0.999, eps 1e-8)
per step with learning rate ``1e-2 (1 - i / 100)`` at step i (i = 0 the noisiest); the loss is the mean squared
error over the VP latent; the conditional prediction is computed once per step; an inner loop stops after the
update made with a loss below ``1e-5 + 2e-5 i``; N = 10. Plain DDIM (eta 0, no x0 clipping) throughout.

Everything runs in one ``jax.jit`` program: a ``lax.scan`` up the levels (the pivot), a ``lax.scan`` down them
whose body runs the inner Adam steps in a ``lax.while_loop`` (its early stop is the loop condition), each image
under ``jax.vmap`` with its own embeddings. Images, prompts, guidance and the optimiser settings are traced; the
step count is static.

Coordinates: jaxdiff samples in EDM / VE coordinates ``x = z / sqrt(alpha)`` at ``sigma = sqrt(1/alpha - 1)``;
results meant for the SD recipe are VP latents (diffusers' ``latents=``), the pivot is kept in VE coordinates.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import conditioning, sampling
from jaxdiff._pytree import pytree_dataclass
from jaxdiff._transforms import Transform
from jaxdiff._util import as_leaves
from jaxdiff.conditioning import PerImage, StepIndex, conditional_flag, per_image_value, tile_batch
from jaxdiff.samplers import DDIM
from jaxdiff.schedules import Sigmas

Array = jax.Array
EVALUATE_AT = sampling.EVALUATE_AT

__all__ = ["NullTextContext", "NullTextInversion", "NullTextOptions", "ddim_invert", "ddim_plan", "image_latents",
           "invert", "invert_pivot", "null_text_inversion", "null_text_inversion_jit", "null_text_uncond",
           "reconstruct"]


# ---- settings and results --------------------------------------------------------------------------

@pytree_dataclass
class NullTextOptions:
    """The inner optimisation of Algorithm 1, as traced leaves (changing them never recompiles).

    Step i (0 = the noisiest) runs at most ``inner_steps`` Adam steps at learning rate
    ``learning_rate * max(1 - lr_decay i, 0)`` and stops after the update made with a loss below
    ``epsilon + epsilon_growth i``. The defaults are the reference's (N = 10, 1e-2 (1 - i/100), 1e-5 + 2e-5 i).
    ``inner_steps = 0`` leaves the empty-prompt embedding in place (plain DDIM inversion then CFG sampling).
    """

    inner_steps: Any = 10
    learning_rate: Any = 1e-2
    lr_decay: Any = 1e-2
    epsilon: Any = 1e-5
    epsilon_growth: Any = 2e-5

    def __post_init__(self) -> None:
        as_leaves(self, floats=("learning_rate", "lr_decay", "epsilon", "epsilon_growth"), ints=("inner_steps",))


@pytree_dataclass
class NullTextInversion:
    """What :func:`null_text_inversion` returns, per image (axis 0); S is the number of DDIM steps.

    - ``latents`` (B, h, w, c): ``z*_T`` in VP scale (diffusers' ``latents=``, the SD recipe's start noise);
    - ``uncond`` (B, S, L, D): the optimised unconditional embedding of each sampling step (0 = the noisiest);
    - ``pivot`` (B, S + 1, h, w, c): the inversion trajectory in VE coordinates, ``pivot[:, i]`` at
      ``sigmas.values[i]`` (``pivot[:, 0]`` = ``z*_T``, ``pivot[:, S]`` = the image latent ``z*_0``);
    - ``loss_before`` / ``loss`` (B, S): the step's loss (mean squared VP error to ``z*_{t-1}``) with the
      embedding the step started from, and after its optimisation (that of the trajectory actually taken);
    - ``inner_steps`` (B, S): the Adam steps each sampling step took.
    """

    latents: Array
    uncond: Array
    pivot: Array
    loss_before: Array
    loss: Array
    inner_steps: Array


# ---- per-step unconditional embeddings at sampling time ----------------------------------------------

@pytree_dataclass
class NullTextContext:
    """Network transform: the unconditional rows (``cond["conditional"] == 0``) read ``embeddings[k]`` as their
    context at sampling step ``k`` (counted from the run's first step); the conditional rows are untouched.

    ``embeddings`` is (S, L, D), shared by every image of the call, or (B, S, L, D) one set per image (a
    :class:`jaxdiff.conditioning.PerImage` inside the SD recipe, which hands each image its own). ``step`` is
    set by the runner (:func:`jaxdiff.conditioning.at_step`). With every entry equal to the empty prompt's
    embedding this is plain classifier-free guidance (to float rounding: XLA may fuse the program differently).
    """

    inner: Any
    embeddings: Any
    step: StepIndex = dataclasses.field(default_factory=StepIndex)

    def __call__(self, x: Array, t: Array, cond: Any) -> Array:
        emb = jnp.asarray(per_image_value(self.embeddings))
        k = self.step.value - self.step.first
        row = emb[k][None] if emb.ndim == 3 else emb[:, k]  # (1 or b, L, D)
        ctx = cond["context"]
        flag = conditional_flag(cond, x.shape[0])
        uncond = tile_batch(row.astype(ctx.dtype), x.shape[0])
        return self.inner(x, t, {**cond, "context": jnp.where((flag == 0)[:, None, None], uncond, ctx)})


def null_text_uncond(embeddings: Any) -> Transform:
    """Network transform reading the per-step unconditional embeddings (S, L, D) or (B, S, L, D) (one set per
    prompt: batched with the request by the SD recipe); see :class:`NullTextContext`. Compose it with others
    (attention control) through :func:`jaxdiff.conditioning.chain`."""
    emb = jnp.asarray(embeddings)
    if emb.ndim not in (3, 4):
        raise ValueError(f"the unconditional embeddings must be (steps, L, D) or (images, steps, L, D), "
                         f"got shape {emb.shape}; pass NullTextInversion.uncond (or one image's uncond[i])")
    return Transform(NullTextContext, dict(embeddings=PerImage(emb) if emb.ndim == 4 else emb, step=StepIndex()))


# ---- the pure program --------------------------------------------------------------------------------

def invert_pivot(denoiser: Any, x0: Array, sigmas: Sigmas, cond: Any, steps: int,
                 evaluate_at: str = "target") -> Array:
    """DDIM inversion keeping every level: (S + 1, ...) with entry i at ``sigmas.values[i]`` (VE coordinates).

    The moves are :func:`jaxdiff.sampling.invert`'s (same step function, same order), in a ``lax.scan`` of
    ``steps`` (static); the first entry equals ``sampling.invert(denoiser, x0, sigmas, cond,
    evaluate_at=evaluate_at)`` for a schedule of ``steps`` steps.
    """
    v = sigmas.values

    def up(x: Array, j: Array) -> tuple[Array, Array]:
        k = steps - 1 - j  # the downward step this move mirrors, from v[k] to v[k + 1]
        x = sampling._invert_step(lambda x_, s_: denoiser(x_, s_, cond), x, v[k + 1], v[k], evaluate_at)
        return x, x

    _, ups = jax.lax.scan(up, x0, jnp.arange(steps, dtype=jnp.int32))
    return jnp.concatenate([x0[None], ups])[::-1]


def _pair(ctx: Array, uctx: Array) -> tuple[dict, dict]:
    """The conditioning of the two halves of classifier-free guidance, as the SD recipe builds them."""
    one = jnp.ones((ctx.shape[0],), jnp.float32)
    return ({"context": ctx, conditioning.CONDITIONAL: one}, {"context": uctx, conditioning.CONDITIONAL: 0 * one})


def _one_image(m: Any, sigmas: Sigmas, z0: Array, ctx: Array, uctx: Array, scale: Array, opts: NullTextOptions,
               steps: int, quantize: bool, evaluate_at: str) -> tuple:
    """Algorithm 1 for one image (batch of one inside): (z*_T VP, phis, pivot, loss before, loss, inner steps)."""
    den = m.denoiser(quantize)
    sampler, key, v = DDIM(), jax.random.key(0), sigmas.values  # eta 0: the key is never read
    x0 = z0[None] * jnp.sqrt(1.0 + v[steps] ** 2)
    pivot = invert_pivot(den, x0, sigmas, {"context": ctx[None]}, steps, evaluate_at)
    adam = optax.scale_by_adam()  # torch's Adam: b1 0.9, b2 0.999, eps 1e-8 outside the root

    def outer(carry: tuple[Array, Array], i: Array) -> tuple[tuple[Array, Array], tuple]:
        x, phi = carry
        s, s_next, target = v[i], v[i + 1], pivot[i + 1]
        vp = jax.lax.rsqrt(1.0 + s_next * s_next)  # VE -> VP at the level reached
        x0_c = den(x, s, {"context": ctx[None]})  # frozen within the step (the reference computes it once)

        def loss(p: Array) -> Array:
            def guided(x_: Array, s_: Array) -> Array:  # DDIM (eta 0) calls it once, at (x, s): where x0_c was taken
                x0_u = den(x_, s_, {"context": p[None]})
                return x0_u + scale * (x0_c - x0_u)

            x_next, _ = sampler.step(guided, (), x, s, s_next, key)
            return jnp.mean(((x_next - target) * vp) ** 2)

        lr = opts.learning_rate * jnp.maximum(1.0 - opts.lr_decay * i, 0.0)
        threshold = opts.epsilon + opts.epsilon_growth * i

        def more(st: tuple) -> Array:
            return (st[0] < opts.inner_steps) & ~st[3]

        def adam_step(st: tuple) -> tuple:
            j, p, state, _, first = st
            value, grad = jax.value_and_grad(loss)(p)
            update, state = adam.update(grad, state)
            return j + 1, p - lr * update, state, value < threshold, jnp.where(j == 0, value, first)

        start = (jnp.int32(0), phi, adam.init(phi), jnp.bool_(False), jnp.float32(jnp.nan))
        taken, phi, _, _, first = jax.lax.while_loop(more, adam_step, start)
        cond, uncond = _pair(ctx[None], phi[None])
        x_next, _ = sampler.step(lambda x_, s_: m.guided(uncond, scale, quantize=quantize)(x_, s_, cond), (), x, s,
                                 s_next, key)
        after = jnp.mean(((x_next - target) * vp) ** 2)
        return (x_next, phi), (phi, jnp.where(taken > 0, first, after), after, taken)

    _, (phis, before, after, taken) = jax.lax.scan(outer, (pivot[0], uctx), jnp.arange(steps, dtype=jnp.int32))
    return pivot[0][0] * jax.lax.rsqrt(1.0 + v[0] ** 2), phis, pivot[:, 0], before, after, taken


def null_text_inversion(m: Any, sigmas: Sigmas, z0: Array, ctx: Array, uctx: Array, scale: Array,
                        options: NullTextOptions, *, steps: int, quantize: bool = True,
                        evaluate_at: str = "target") -> NullTextInversion:
    """The pure program (:data:`null_text_inversion_jit` compiles it; ``steps``, ``quantize``, ``evaluate_at`` static).

    ``m`` an :class:`jaxdiff.pipelines.stable_diffusion.SDModels`; ``sigmas`` a DDIM schedule of ``steps`` steps
    (:func:`ddim_plan`); ``z0`` (B, h, w, c) the image latents in VP scale (``m.to_latent`` of the posterior mean);
    ``ctx`` (B, L, D) the prompts' embeddings; ``uctx`` (B, L, D) the embeddings each run starts from (the empty
    prompt's); ``scale`` (B,) the guidance scale ``w``.
    """
    _check_evaluate_at(evaluate_at)
    if not isinstance(sigmas.count, jax.core.Tracer) and int(sigmas.count) != steps:
        raise ValueError(f"the schedule has {int(sigmas.count)} steps but steps={steps}; build it with "
                         f"ddim_plan(sd, {steps}).sigmas")

    def one(z: Array, c: Array, u: Array, w: Array) -> tuple:
        return _one_image(m, sigmas, z, c, u, w, options, steps, quantize, evaluate_at)

    return NullTextInversion(*jax.vmap(one)(z0, ctx, uctx, scale))


null_text_inversion_jit = jax.jit(null_text_inversion, static_argnames=("steps", "quantize", "evaluate_at"))


# ---- host side: the SD recipe ------------------------------------------------------------------------

def ddim_plan(sd: Any, steps: int) -> Any:
    """The recipe's DDIM timesteps for ``steps`` steps with plain DDIM (eta 0, no x0 clipping, no threshold), as
    the reference runs it (``DDIMScheduler(clip_sample=False)``)."""
    return dataclasses.replace(sd.plan(steps, "ddim"), sampler=DDIM(), threshold=None)


@jax.jit
def _encode(m: Any, images: Array, ids: Array, neg_ids: Array) -> tuple[Array, Array, Array]:
    """(VP image latents (the VAE posterior mean, scaled), prompt embeddings, negative embeddings) in one program."""
    return m.to_latent(m.encode_image(images)[0]), m.encode_text(ids), m.encode_text(neg_ids)


def _inputs(sd: Any, image: Any, prompt: str | list[str], negative: str = "") -> tuple[Array, Array, Array]:
    """Images (PIL, or arrays in [0, 1]) and captions -> (z*_0 (n, h, w, c) VP, C (n, L, D), psi(negative))."""
    from jaxdiff.pipelines.stable_diffusion import _check_size, _image_array

    n = 1 if getattr(image, "ndim", 4) == 3 or hasattr(image, "convert") else len(image)
    img = _image_array(image, n)
    _check_size(img.shape[1], img.shape[2], sd.models.vae_factor)
    return _encode(sd.models, jnp.asarray(img), jnp.asarray(sd.tokenize(_prompts(prompt, n))),
                   jnp.asarray(sd.tokenize([negative] * n)))


def _prompts(prompt: Any, n: int | None = None) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if n is not None and len(prompts) == 1:
        prompts = prompts * n
    if not prompts or (n is not None and len(prompts) != n):
        raise ValueError(f"give one prompt, or one per image ({n}), got {len(prompts)}")
    return prompts


def _check_evaluate_at(evaluate_at: str) -> None:
    if evaluate_at not in EVALUATE_AT:
        raise ValueError(f"evaluate_at must be one of {', '.join(EVALUATE_AT)}, got {evaluate_at!r}")


def invert(sd: Any, image: Any, prompt: str | list[str], *, steps: int = 50, guidance: Any = 7.5,
           options: NullTextOptions | None = None, evaluate_at: str = "target",
           negative: str = "") -> NullTextInversion:
    """Null-text inversion of real images with their captions on a :class:`StableDiffusion` recipe.

    ``image``: PIL image(s) or arrays (H, W, 3) / (B, H, W, 3) in [0, 1]; ``prompt`` one caption or one per image;
    ``guidance`` the scale ``w`` the images will be reconstructed / edited at. The optimisation starts from the
    embedding of ``negative`` (the empty prompt). Reconstruct with :func:`reconstruct`; edit by sampling from
    ``latents`` with :func:`null_text_uncond` among the network transforms.
    """
    _check_evaluate_at(evaluate_at)
    z0, ctx, uctx = _inputs(sd, image, prompt, negative)
    plan = ddim_plan(sd, steps)
    scale = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (z0.shape[0],))
    return null_text_inversion_jit(sd.models, plan.sigmas, z0, ctx, uctx, scale, options or NullTextOptions(),
                                   steps=int(steps), quantize=plan.quantize, evaluate_at=evaluate_at)


def image_latents(sd: Any, image: Any) -> Array:
    """``z*_0``: images (PIL, or arrays (H, W, 3) / (B, H, W, 3) in [0, 1]) -> VP latents (the posterior mean)."""
    return _inputs(sd, image, "")[0]


def ddim_invert(sd: Any, image: Any, prompt: str | list[str], *, steps: int = 50,
                evaluate_at: str = "target") -> Array:
    """Plain DDIM inversion at guidance 1 (:func:`jaxdiff.sampling.invert` on the prompt-conditional U-Net):
    ``z*_T`` (B, h, w, c) in VP scale, the start for :func:`reconstruct` without embeddings."""
    _check_evaluate_at(evaluate_at)
    z0, ctx, _ = _inputs(sd, image, prompt)
    plan = ddim_plan(sd, steps)
    v = np.asarray(plan.sigmas.values)
    x = sampling.invert(sd.models.denoiser(plan.quantize), z0 * np.sqrt(1.0 + v[steps] ** 2), plan.sigmas,
                        {"context": ctx}, evaluate_at=evaluate_at)
    return x / np.sqrt(1.0 + v[0] ** 2)


def reconstruct(sd: Any, latents: Any, prompt: str | list[str], uncond: Any = None, *, guidance: Any = 7.5,
                steps: int | None = None, output: str = "np", network_transform: Any = None,
                mesh: Any = "auto") -> Any:
    """Sample with the SD recipe from ``latents`` (VP, e.g. ``NullTextInversion.latents``) by plain DDIM at
    ``guidance``, the unconditional half of step k reading ``uncond[..., k, :, :]`` ((B, S, L, D) or (S, L, D);
    None: the empty prompt at every step, i.e. DDIM-inversion reconstruction). ``network_transform`` (e.g. an
    attention control) runs after the per-step embeddings are set. ``output`` as ``sd(...)``: "np" images
    (B, H, W, 3) in [0, 1], or "latent" (VP)."""
    if output not in ("np", "latent"):
        raise ValueError(f"output must be 'np' or 'latent', got {output!r}")
    lat = np.asarray(latents, np.float32)
    if uncond is not None:
        uncond = jnp.asarray(uncond)
        if steps is not None and steps != uncond.shape[-3]:
            raise ValueError(f"{uncond.shape[-3]} per-step embeddings for {steps} steps; invert with as many steps")
        steps = int(uncond.shape[-3])
    steps = 50 if steps is None else int(steps)
    f = sd.models.vae_factor
    req, _, static = sd.request(_prompts(prompt, lat.shape[0]), steps=steps, sampler="ddim", guidance=guidance,
                                latents=lat, height=lat.shape[1] * f, width=lat.shape[2] * f)
    nt = conditioning.chain(network_transform, None if uncond is None else null_text_uncond(uncond))  # ours outermost
    return sd.run(req, ddim_plan(sd, steps), static, network_transform=nt if nt.transforms else None,
                  latent=output == "latent", mesh=mesh)
