"""Both levels of transforms in the SD recipe: a user's network transform (inside guidance, at every U-Net call)
and a user's denoiser transform run inside one compiled program; the stages follow the request's structure."""
from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditioning, guidance, sampling
from jaxdiff._pytree import pytree_dataclass
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.pipelines import stable_diffusion as S


@pytree_dataclass
class ConditionalScale:
    """Network transform: the U-Net output times ``s`` on the conditional rows of CFG only (reads ``"conditional"``)."""

    inner: Any
    s: Any

    def __call__(self, x: Any, t: Any, cond: Any) -> Any:
        c = jnp.reshape(cond[conditioning.CONDITIONAL], (-1, 1, 1, 1))
        return self.inner(x, t, cond) * (1.0 + (self.s - 1.0) * c)


@pytree_dataclass
class ContextBias:
    """Network transform: ``b`` added to the text context the U-Net reads."""

    inner: Any
    b: Any

    def __call__(self, x: Any, t: Any, cond: Any) -> Any:
        return self.inner(x, t, {**cond, "context": cond["context"] + self.b})


@pytree_dataclass
class Shift:
    """Denoiser transform: ``D + c``."""

    inner: Any
    c: Any

    def __call__(self, x: Any, sigma: Any, cond: Any = None) -> Any:
        return self.inner(x, sigma, cond) + self.c


def _user(s: float, b: float, c: float) -> tuple[Any, Any]:
    net = conditioning.chain(conditioning.Transform(ContextBias, {"b": jnp.float32(b)}),
                             conditioning.Transform(ConditionalScale, {"s": jnp.float32(s)}))
    return net, guidance.Transform(Shift, {"c": jnp.float32(c)})


KW = dict(negative="c", steps=3, sampler="dpmpp_2m", seed=[3], guidance=4.0, height=8, width=8, output="latent",
          mesh=None)


def _by_hand(sd: Any, s: float, b: float, c: float) -> np.ndarray:
    """The same pieces composed with the core: U-Net network, user network transforms, VP adapter, CFG with the
    conditional flag, user denoiser transform, ``sampling.sample`` from seed 3's documented noise and key."""
    _, plan, _ = sd.request(["a b"], **{k: v for k, v in KW.items() if k not in ("output", "mesh")})
    net = conditioning.apply(S.UNetNet(sd.models.unet), *_user(s, b, c)[:1])
    den = DiscreteVPDenoiser(net, sd.models.alphas_cumprod, "epsilon")
    cond = {"context": sd.encode_prompt(["a b"]), "conditional": jnp.ones((1,))}
    uncond = {"context": sd.encode_prompt(["c"]), "conditional": jnp.zeros((1,))}
    den = guidance.apply(den, guidance.classifier_free(4.0, uncond), plan.threshold, _user(s, b, c)[1])
    x = S.noise_for_seed(jnp.uint32(3), (1, 4, 4, 4)) * plan.init_sigma
    key = jax.random.fold_in(jax.random.key(jnp.uint32(3)), S.SAMPLER_STREAM)
    out = sampling.sample(den, plan.sampler, plan.sigmas, x, key, cond)
    final = plan.sigmas.values[plan.sigmas.count]
    return np.asarray(out * jax.lax.rsqrt(1.0 + final * final))


def test_user_network_and_denoiser_transforms_in_one_program(tiny_sd):
    S.generate_latents_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = S.generate_latents_jit._cache_size()
    values = [(1.5, 0.3, 0.02), (0.7, -0.2, -0.05)]
    outs = []
    for s, b, c in values:
        net, den = _user(s, b, c)
        outs.append(tiny_sd(["a b"], network_transform=net, transform=den, **KW))
    assert S.generate_latents_jit._cache_size() - before == 1
    for (s, b, c), out in zip(values, outs):
        np.testing.assert_allclose(out, _by_hand(tiny_sd, s, b, c), atol=1e-5, rtol=1e-5)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


def test_conditional_flag_marks_the_cfg_halves(tiny_sd):
    """At guidance 0 the result is the unconditional half alone, which a conditional-rows-only scale leaves alone."""
    def run(s: float, scale: float) -> np.ndarray:  # the same program as the test above: only values change
        net, den = _user(s, 0.0, 0.0)
        return tiny_sd(["a b"], network_transform=net, transform=den, **dict(KW, guidance=scale, seed=[4]))

    np.testing.assert_array_equal(run(3.0, 0.0), run(1.0, 0.0))
    assert np.abs(run(3.0, 1.0) - run(1.0, 1.0)).max() > 1e-3  # the conditional half alone: now the scale acts


def test_unet_net_passes_only_present_keywords():
    seen: list = []

    def unet(x: Any, t: Any, context: Any, **kw: Any) -> Any:
        seen.append(sorted(kw))
        return x + context.mean()

    x, ctx = jnp.zeros((2, 2, 2, 4)), jnp.ones((2, 3, 8))
    S.UNetNet(unet)(x, 1.0, {"context": ctx, "conditional": jnp.ones((2,))})  # today's U-Net signature
    residuals = conditioning.Residuals(mid=jnp.ones((2, 1, 1, 8)))
    S.UNetNet(unet)(x, 1.0, {"context": ctx, "residuals": residuals, "attention": None, "class_labels": jnp.ones(2)})
    assert seen == [[], ["class_labels", "residuals"]]


def test_stages_follow_the_request_structure(tiny_sd):
    """No mode string: the program reads an init image (image-to-image) from the request alone."""
    assert "mode" not in inspect.signature(S.generate_latents).parameters and not hasattr(S, "MODES")
    image = np.full((1, 8, 8, 3), 0.25, np.float32)
    kw = dict(negative="", steps=4, sampler="ddim", seed=[2], height=8, width=8)
    req, plan, static = tiny_sd.request(["a"], image=image, strength=0.6, **kw)
    assert set(static) == {"height", "width", "quantize"}
    lat = S.generate_latents_jit(tiny_sd.models, plan.sampler, req, guidance.chain(plan.threshold), **static)
    # the user-facing image-to-image path (diffusers parity: test_sd_parity.py)
    np.testing.assert_array_equal(lat, tiny_sd(["a"], image=image, strength=0.6, output="latent", mesh=None, **kw))
