"""PriorTransformer against diffusers' PriorTransformer (tiny random weights, every zero-initialised parameter
perturbed), its causal + padding mask, post-processing, and the ``net(x, t, cond)`` form under jit and grad."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import load_model_folder
from jaxdiff.models._pure import PureModel
from jaxdiff.models.prior import PriorNet, PriorTransformerConfig, attention_bias

B, T, D = 3, 6, 16
KARLO = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, embedding_dim=D, num_embeddings=T)
# Kandinsky 2.x's prior options: norms on the input and the text embedding, a wider text embedding, no output token
KANDINSKY = dict(KARLO, norm_in_type="layer", embedding_proj_norm_type="layer", embedding_proj_dim=20,
                 clip_embed_dim=24, time_embed_dim=40, additional_embeddings=3, added_emb_type=None)


def _torch_prior(kwargs: dict, seed: int):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.PriorTransformer(**kwargs)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # diffusers starts positions, prd, clip_mean/std at zero: give them values
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(kwargs: dict, seed: int):
    rng = np.random.default_rng(seed)
    proj = kwargs.get("embedding_proj_dim") or D
    x = rng.standard_normal((B, D)).astype(np.float32)
    emb = rng.standard_normal((B, proj)).astype(np.float32)
    states = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = np.arange(T)[None] < np.array([[2], [T], [4]])  # three prompt lengths
    t = np.array([999, 500, 3])
    return x, t, emb, states, mask


@pytest.fixture(scope="module", params=["karlo", "kandinsky"])
def pair(request, tmp_path_factory):
    kwargs = KARLO if request.param == "karlo" else KANDINSKY
    model = _torch_prior(kwargs, 0)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(folder), safe_serialization=True)
    return kwargs, model, load_model_folder(folder)


_forward = jax.jit(lambda m, *a: m(*a))


@pytest.mark.parity
def test_matches_diffusers(pair):
    """With the text mask (causal + padding) and, for karlo's options, without (full attention, as diffusers);
    post-processing with clip_std / clip_mean. Padding text tokens change nothing, real ones do."""
    import torch

    kwargs, ref, ours = pair
    x, t, emb, states, mask = _inputs(kwargs, 1)
    pure = PureModel.of(ours)
    for masked in (True, False) if kwargs is KARLO else (True,):
        with torch.no_grad():
            want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(emb), torch.from_numpy(states),
                       attention_mask=torch.from_numpy(mask) if masked else None).predicted_image_embedding.numpy()
        got = _forward(pure, x, t, emb, states, mask if masked else None)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        post = ref.post_process_latents(torch.from_numpy(want)).numpy()
    np.testing.assert_allclose(ours.post_process_latents(got), post, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.pre_process_latents(ours.post_process_latents(got)), got, atol=1e-4, rtol=1e-4)

    got = _forward(pure, x, t, emb, states, mask)
    padded, real = states.copy(), states.copy()
    padded[0, 3] += 5.0  # a padding token of the first prompt (length 2)
    real[0, 1] += 5.0  # a real one
    np.testing.assert_allclose(_forward(pure, x, t, emb, padded, mask), got, atol=1e-5)
    assert np.abs(np.asarray(_forward(pure, x, t, emb, real, mask)) - np.asarray(got))[0].max() > 1e-3


def test_mask_is_causal_plus_padding():
    """Keys after the query and padding text keys get -10000 (both: -20000); the added tokens are never padding."""
    bias = np.asarray(attention_bias(jnp.array([[True, False]]), 2))[0, 0]
    want = np.array([[0, -2, -1, -1], [0, -1, -1, -1], [0, -1, 0, -1], [0, -1, 0, 0]]) * 1e4
    np.testing.assert_array_equal(bias, want)


def test_net_form_and_config_errors():
    net = PriorNet(lambda *a: a)
    cond = dict(text_embeds=1, text_states=2, text_mask=3)
    assert net(0, 5, cond) == (0, 5, 1, 2, 3)  # PriorNet hands the dict's entries to the prior in its order
    with pytest.raises(TypeError, match="text_embeds"):
        net(0, 5, (1, 2))
    with pytest.raises(ValueError, match="norm_in_type"):
        PriorTransformerConfig(norm_in_type="batch")
    with pytest.raises(ValueError, match="added_emb_type"):
        PriorTransformerConfig(added_emb_type="cls")
