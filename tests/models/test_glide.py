"""GLIDE: the text encoder against a numpy transcription of its equations, openai's checkpoint names and
layouts (against diffusers' layout and an attention computed by hand), the released models' sizes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.glide import OpenAIView, plan, to_openai
from jaxdiff.convert.torch_layout import load_torch_tensors
from jaxdiff.models._pure import PureModel
from jaxdiff.models.glide import GlideConfig, GlideTextEncoder
from jaxdiff.models.layers import Maker

from tests.models._glide_reference import BASE, UPSAMPLER, openai_layout

TINY = GlideConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
                   num_head_channels=16, text_ctx=6, xf_width=32, xf_layers=2, xf_heads=2, n_vocab=20,
                   norm_num_groups=8)
TINY_LAYOUT = dict(image_size=16, mc=32, mult=(1, 2), nres=1, attn_res=(8,), in_ch=3, text_ctx=6, width=32, layers=2,
                   vocab=20)


def _random_openai(layout: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in layout.items()}
    for k in out:  # norms near identity so activations stay O(1)
        if k.endswith(("ln_1.weight", "ln_2.weight", "final_ln.weight", "norm.weight")):
            out[k] = (1.0 + 0.1 * rng.standard_normal(out[k].shape)).astype(np.float32)
    return out


# ---- numpy transcription of GLIDE's text transformer (Nichol et al. 2022 App. A; glide_text2im's xf.py) ----

def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _text_reference(t: dict, tokens, mask, heads: int, layers: int):
    x = t["token_embedding.weight"][tokens] + t["positional_embedding"][None]
    x = np.where(mask[..., None], x, t["padding_embedding"][None])
    b, n, w = x.shape
    ch = w // heads
    for i in range(layers):
        p = lambda name: t[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = _ln(x, p("ln_1.weight"), p("ln_1.bias"))
        qkv = (h @ p("attn.c_qkv.weight").T + p("attn.c_qkv.bias")).reshape(b, n, heads, 3 * ch)
        q, k, v = qkv[..., :ch], qkv[..., ch:2 * ch], qkv[..., 2 * ch:]
        wts = _softmax(np.einsum("bthc,bshc->bhts", q, k) / math.sqrt(ch))
        a = np.einsum("bhts,bshc->bthc", wts, v).reshape(b, n, w)
        x = x + a @ p("attn.c_proj.weight").T + p("attn.c_proj.bias")
        h = _ln(x, p("ln_2.weight"), p("ln_2.bias"))
        x = x + _gelu(h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")
    x = _ln(x, t["final_ln.weight"], t["final_ln.bias"])
    return x[:, -1] @ t["transformer_proj.weight"].T + t["transformer_proj.bias"], x


def test_text_encoder_matches_equations():
    """Token + position embeddings, padding embedding where the mask is 0, per-head fused [q, k, v], no causal
    mask, exact GELU, final LN, last-token projection: the encoder equals the numpy transcription."""
    tensors = {k: v for k, v in _random_openai(openai_layout(**TINY_LAYOUT), 1).items()
               if not k.startswith(("input_blocks", "middle_block", "output_blocks", "out.", "time_embed"))}
    enc = load_torch_tensors(nnx.eval_shape(lambda: GlideTextEncoder(TINY, Maker(nnx.Rngs(0)))), tensors)
    tokens = np.array([[3, 7, 19, 19, 19, 19], [5, 1, 2, 0, 11, 19]])
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    run = jax.jit(lambda e, t, m: tuple(e(t, m)))
    proj, states = run(PureModel.of(enc), jnp.asarray(tokens), jnp.asarray(mask))
    ref_proj, ref_states = _text_reference(tensors, tokens, mask, TINY.xf_heads, TINY.xf_layers)
    np.testing.assert_allclose(np.asarray(states), ref_states, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(proj), ref_proj, rtol=1e-4, atol=1e-4)
    # the padding embedding matters: a masked position's token id does not
    other = tokens.copy()
    other[0, 3] = 4
    np.testing.assert_array_equal(np.asarray(run(PureModel.of(enc), jnp.asarray(other), jnp.asarray(mask))[1]),
                                  np.asarray(states))
    with pytest.raises(ValueError, match="mask"):
        enc(jnp.asarray(tokens))


# ---- openai names <-> diffusers' layout ------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_unet():
    """diffusers' UNet2DConditionModel of the tiny config with openai's tensors, converted, loaded strictly."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    tensors = _random_openai(openai_layout(**TINY_LAYOUT), 2)
    view = OpenAIView(tensors, TINY)
    unet = diffusers.UNet2DConditionModel(**TINY.unet_config())
    result = unet.load_state_dict({k[5:]: torch.tensor(view[k]) for k in view if k.startswith("unet.")}, strict=True)
    return unet, tensors, view, result


def test_openai_names_fill_the_diffusers_layout_and_invert(diffusers_unet):
    """Every openai tensor of a tiny GLIDE maps onto diffusers' UNet2DConditionModel (unCLIP decoder blocks)
    with no key missing or left over, and the inverse rebuilds openai's tensors bit for bit."""
    _, tensors, view, result = diffusers_unet
    assert not result.missing_keys and not result.unexpected_keys
    back = to_openai({k: view[k] for k in view}, TINY)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
    with pytest.raises(ValueError, match="not part of a GLIDE model"):
        plan(["input_blocks.99.0.in_layers.0.weight"], TINY)


def test_attention_head_layout_matches_glide_equations(diffusers_unet):
    """openai's fused ``qkv`` (per head [q, k, v]) and ``encoder_kv`` (per head [k, v], text keys before image
    keys), converted, give diffusers' added-KV attention the output of GLIDE's AttentionBlock equations."""
    import torch

    unet, tensors, _, _ = diffusers_unet
    rng = np.random.default_rng(3)
    c, hw, heads = 64, 4, 64 // TINY.num_head_channels
    x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
    enc = rng.standard_normal((2, TINY.text_ctx, TINY.xf_width)).astype(np.float32)
    with torch.no_grad():
        got = unet.mid_block.attentions[0](torch.tensor(x), encoder_hidden_states=torch.tensor(enc)).numpy()

    p = lambda n: tensors[f"middle_block.1.{n}"]  # noqa: E731
    g = x.reshape(2, TINY.norm_num_groups, -1)
    g = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(2, c, -1)
    h = g * p("norm.weight")[:, None] + p("norm.bias")[:, None]
    qkv = np.einsum("oc,bct->bot", p("qkv.weight")[..., 0], h) + p("qkv.bias")[:, None]
    ch = c // heads
    q, k, v = np.split(qkv.reshape(2 * heads, 3 * ch, -1), 3, axis=1)
    ekv = np.einsum("ow,blw->bol", p("encoder_kv.weight")[..., 0], enc) + p("encoder_kv.bias")[:, None]
    ek, ev = np.split(ekv.reshape(2 * heads, 2 * ch, -1), 2, axis=1)
    k, v = np.concatenate([ek, k], -1), np.concatenate([ev, v], -1)
    w = _softmax(np.einsum("bct,bcs->bts", q, k) / math.sqrt(ch))
    a = np.einsum("bts,bcs->bct", w, v).reshape(2, c, -1)
    ref = x + (np.einsum("oc,bct->bot", p("proj_out.weight")[..., 0], a) + p("proj_out.bias")[:, None]).reshape(x.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_released_layout_sizes():
    """The independent transcription of openai's layout counts the figures glide-text2im's notebook prints
    (``total base parameters`` 385,030,726; ``total upsampler parameters`` 398,361,286)."""
    assert sum(math.prod(s) for s in openai_layout(**BASE).values()) == 385_030_726
    assert sum(math.prod(s) for s in openai_layout(**UPSAMPLER).values()) == 398_361_286


def test_glide_unet_matches_diffusers_and_round_trips(diffusers_unet, tmp_path):
    """openai-named tensors loaded into GlideUNet: the output equals diffusers' UNet2DConditionModel given the same
    converted weights, the text states as encoder_hidden_states and the last-token projection as class labels;
    saved back in openai's names (safetensors) and reloaded, every tensor is bit-identical."""
    import torch

    from jaxdiff.convert.glide import load_glide, openai_state_dict, save_openai

    unet, tensors, _, _ = diffusers_unet
    model = load_glide(tensors, TINY)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    tokens = np.array([[3, 7, 19, 19, 19, 19], [5, 1, 2, 0, 11, 19]])
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    cond = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
    pure = PureModel.of(model)
    out, text = jax.jit(lambda m, x_, t_, c: (m(x_, t_, c), m.bind("encode")(c["tokens"], c["mask"])))(
        pure, jnp.asarray(x), jnp.asarray(t), cond)
    assert out.shape == (2, 16, 16, 6)
    with torch.no_grad():
        ref = unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t),
                   encoder_hidden_states=torch.tensor(np.asarray(text["text_states"])),
                   class_labels=torch.tensor(np.asarray(text["text_proj"]))).sample.numpy()
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)

    path = tmp_path / "glide.safetensors"
    save_openai(model, path)
    again = openai_state_dict(load_glide(path, TINY))
    assert sorted(again) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_released_models_eval_shape():
    """The released base and upsampler built abstractly (``nnx.eval_shape``): parameter counts equal the
    released figures and every openai tensor name and shape equals the independent layout transcription."""
    from jaxdiff.convert.glide import abstract_glide, openai_shapes
    from jaxdiff.convert.torch_layout import count_params

    for cfg, ref in ((GlideConfig(), BASE), (GlideConfig.upsampler(), UPSAMPLER)):
        model = abstract_glide(cfg)
        assert count_params(model) == sum(math.prod(s) for s in openai_layout(**ref).values())
        assert openai_shapes(cfg, model) == openai_layout(**ref)
