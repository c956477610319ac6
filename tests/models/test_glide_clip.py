"""GLIDE's noise-aware CLIP image tower: openai names load, the forward equals a numpy transcription of its
equations, the released layout's size by nnx.eval_shape against a count from the config."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.torch_layout import abstract, count_params, load_torch_tensors
from jaxdiff.models._pure import PureModel
from jaxdiff.models.glide_clip import CHANNEL_MEANS, CHANNEL_STDS, GlideCLIPConfig, NoisedImageEncoder

TINY = GlideCLIPConfig(image_size=8, patch_size=4, n_embd=6, n_head=2, n_head_state=4, n_xf_blocks=2, n_timesteps=10)


def _layout(c: GlideCLIPConfig) -> dict[str, tuple[int, ...]]:
    """openai's image-encoder tensors, from encoders.py's ImageEncoder (independent of jaxdiff)."""
    w, ln = c.width, lambda p: {f"{p}.ln.g": (c.width,), f"{p}.ln.b": (c.width,)}  # noqa: E731
    s = {"blocks.input.patch_proj": (w, 3, c.patch_size, c.patch_size), "blocks.input.w_pos": (c.n_context, w),
         "blocks.input.w_t": (c.n_timesteps, w), **ln("blocks.input"), **ln("blocks.output"),
         "blocks.output.f.w": (c.n_embd, w)}
    for i in range(c.n_xf_blocks):
        a, m = f"blocks.block_{i}.f_attn", f"blocks.block_{i}.f_mlp"
        s.update({**ln(a), f"{a}.f_q.w": (w, w), f"{a}.f_q.b": (w,), f"{a}.f_k.w": (w, w), f"{a}.f_v.w": (w, w),
                  f"{a}.f_v.b": (w,), f"{a}.f_c.w": (w, w), f"{a}.f_c.b": (w,), **ln(m), f"{m}.f_1.w": (4 * w, w),
                  f"{m}.f_1.b": (4 * w,), f"{m}.f_2.w": (w, 4 * w), f"{m}.f_2.b": (w,)})
    return s


def _ln(x, g, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * g + b


def _reference(t: dict, x: np.ndarray, steps: np.ndarray, c: GlideCLIPConfig) -> np.ndarray:
    x = ((x + 1) * 127.5 - np.array(CHANNEL_MEANS)) / np.array(CHANNEL_STDS)
    p, n = c.patch_size, c.image_size // c.patch_size
    patches = x.reshape(len(x), n, p, n, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(len(x), n * n, 3 * p * p)
    h = patches @ t["blocks.input.patch_proj"].reshape(c.width, -1).T
    h = np.concatenate([t["blocks.input.w_t"][steps][:, None], h], 1) + t["blocks.input.w_pos"]
    h = _ln(h, t["blocks.input.ln.g"], t["blocks.input.ln.b"])
    d = c.n_head_state
    for i in range(c.n_xf_blocks):
        g = lambda k: t[f"blocks.block_{i}.{k}"]  # noqa: E731
        r = _ln(h, g("f_attn.ln.g"), g("f_attn.ln.b"))
        q = (r @ g("f_attn.f_q.w").T + g("f_attn.f_q.b")).reshape(*r.shape[:2], c.n_head, d)
        k = (r @ g("f_attn.f_k.w").T).reshape(q.shape)
        v = (r @ g("f_attn.f_v.w").T + g("f_attn.f_v.b")).reshape(q.shape)
        w = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = np.einsum("bhts,bshd->bthd", w, v).reshape(r.shape)
        h = h + a @ g("f_attn.f_c.w").T + g("f_attn.f_c.b")
        r = _ln(h, g("f_mlp.ln.g"), g("f_mlp.ln.b")) @ g("f_mlp.f_1.w").T + g("f_mlp.f_1.b")
        r = 0.5 * r * (1 + np.vectorize(math.erf)(r / math.sqrt(2)))
        h = h + r @ g("f_mlp.f_2.w").T + g("f_mlp.f_2.b")
    return _ln(h[:, 0], t["blocks.output.ln.g"], t["blocks.output.ln.b"]) @ t["blocks.output.f.w"].T


def test_noised_clip_tower_matches_equations_and_size():
    rng = np.random.default_rng(0)
    tensors = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in _layout(TINY).items()}
    for k in tensors:
        if k.endswith(".g"):
            tensors[k] = 1.0 + 0.1 * tensors[k]
    enc = load_torch_tensors(abstract(lambda: NoisedImageEncoder(TINY, rngs=nnx.Rngs(0))), tensors)
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    steps = np.array([3, 9])
    got = jax.jit(lambda m, x_, t_: m(x_, t_))(PureModel.of(enc), jnp.asarray(x), jnp.asarray(steps))
    np.testing.assert_allclose(np.asarray(got), _reference(tensors, x.astype(np.float64), steps, TINY),
                               rtol=1e-4, atol=1e-4)
    released = GlideCLIPConfig()
    assert count_params(abstract(lambda: NoisedImageEncoder(released, rngs=nnx.Rngs(0)))) == sum(
        math.prod(s) for s in _layout(released).values())
