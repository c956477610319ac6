"""GLIDE sampling: openai's respacing and schedules by hand, mean-only guidance with learned variance, the
64 -> 256 chain (here 8 -> 16) in one compiled program, bilinear upsampling as torch's."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff._pytree import pytree_dataclass
from jaxdiff.pipelines import cascade
from jaxdiff.pipelines.glide import (base_stage, glide_alphas_cumprod, glide_cascade_jit, pad_tokens, quantize_uint8,
                                     respaced_sigmas, space_timesteps, upsampler_stage)


def test_space_timesteps_by_hand():
    """Sections of 200 steps, ``(size - 1) / (count - 1)`` strides rounded; fast27 swaps 999 for 997."""
    fast = space_timesteps(1000, "fast27")
    assert len(fast) == 27
    assert fast[:10] == [0, 22, 44, 66, 88, 111, 133, 155, 177, 199]          # stride 199 / 9
    assert fast[20:] == [400, 500, 599, 600, 799, 800, 997]                  # 3, 2, 2 per section; 999 -> 997
    hundred = space_timesteps(1000, "100")
    assert len(hundred) == 100 and hundred[:3] == [0, 10, 20] and hundred[-1] == 999  # stride 999 / 99
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")


def test_schedules_and_respaced_sigmas():
    """squaredcos_cap_v2 is ``abar(t) / abar(0)`` of the cosine (eq. 17) up to the 0.999 cap; linear is DDPM's;
    the respaced sigmas are the training sigmas at the kept steps, then 0."""
    ac = glide_alphas_cumprod("squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(ac[:990], [f((i + 1) / 1000) / f(0) for i in range(990)], rtol=1e-5)
    np.testing.assert_allclose(glide_alphas_cumprod("linear"), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)
    s = respaced_sigmas(ac, "fast27")
    used = s.used()
    assert len(used) == 28 and used[-1] == 0.0
    steps = space_timesteps(1000, "fast27")[::-1]
    np.testing.assert_allclose(used[:-1], np.sqrt((1 - ac[steps].astype(np.float64)) / ac[steps]), rtol=1e-6)
    assert np.array_equal(pad_tokens([5, 6], 4)[0], [5, 6, 50256, 50256])


def test_bilinear_upsampling_matches_torch():
    """The upsampler's ``F.interpolate(low_res, mode="bilinear", align_corners=False)`` is jax's linear resize."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(x), (32, 32), mode="bilinear", align_corners=False).numpy()
    got = jax.image.resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (2, 32, 32, 3), "linear")
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-5)


@pytree_dataclass
class ToyNet:
    """``net(x, t, cond)`` with GLIDE's interface: 3 or 6 input channels, eps and variance values out."""

    w: jax.Array

    def __call__(self, x, t, cond):
        h = jnp.einsum("bhwc,cd->bhwd", x, self.w[: x.shape[-1]])
        h = h + 0.3 * cond["text_proj"][:, None, None, :6] + 1e-3 * t[:, None, None, None]
        return jnp.concatenate([0.5 * h[..., :3], jnp.tanh(h[..., 3:])], -1)


def _text(seed, b=2):
    return {"text_proj": jnp.asarray(np.random.default_rng(seed).standard_normal((b, 8)), jnp.float32),
            "text_states": jnp.zeros((b, 4, 8), jnp.float32)}


NET = ToyNet(jnp.asarray(np.random.default_rng(1).standard_normal((6, 6)) * 0.2, jnp.float32))


def test_guidance_is_mean_only_with_conditional_variance():
    """The base stage's guided denoiser: x0 (from guided eps, before clipping) is ``u + s (c - u)``, the variance
    channels are the conditional half's, as glide-text2im's ``model_fn`` keeps them."""
    stage = base_stage(NET, _text(0), _text(1), guidance=4.0, shape=(8, 8, 3), clip=False)
    den = cascade.stage_denoiser(stage, None)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 3)), jnp.float32) * 5.0
    sigma = jnp.full((2,), float(stage.sigmas.values[10]))
    plain = stage.denoiser(NET)
    out, c, u = jax.jit(lambda x_, s_: (den(x_, s_, stage.cond), plain(x_, s_, _text(0)), plain(x_, s_, _text(1))))(
        x, sigma)
    np.testing.assert_allclose(np.asarray(out[..., :3]), np.asarray(u[..., :3] + 4.0 * (c[..., :3] - u[..., :3])),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out[..., 3:]), np.asarray(c[..., 3:]))


def test_cascade_one_program_for_runtime_values():
    """Base (DDPM, learned variance, CFG) then upsampler (DDIM fast27, quantised bilinear input, temperature):
    prompts, guidance, step counts and the temperature change nothing compiled; outputs stay in [-1, 1]."""
    glide_cascade_jit.clear_cache()  # count this test's programs only
    up_net = ToyNet(NET.w * 0.5)
    seen = []
    for guidance, respacing, temp, seed in ((3.0, "25", 0.997, 0), (1.5, "10", 1.0, 3)):
        base = base_stage(NET, _text(seed), _text(seed + 1), guidance=guidance, respacing=respacing, shape=(8, 8, 3))
        up = upsampler_stage(up_net, _text(seed + 2), respacing="fast27", shape=(16, 16, 3))
        low, high = glide_cascade_jit(base, up, jax.random.key(seed), 2, temp)
        seen.append((low, high))
        assert low.shape == (2, 8, 8, 3) and high.shape == (2, 16, 16, 3)
        assert float(jnp.max(jnp.abs(low))) <= 1.0 + 1e-5 and bool(jnp.all(jnp.isfinite(high)))
    assert glide_cascade_jit._cache_size() == 1
    assert not np.allclose(np.asarray(seen[0][0]), np.asarray(seen[1][0]))
    q = quantize_uint8(jnp.asarray([-2.0, -1.0, 0.0, 0.3, 1.0]))
    np.testing.assert_allclose(np.asarray(q), [-1.0, -1.0, 1 / 255, round(1.3 * 127.5) / 127.5 - 1, 1.0], atol=1e-6)
