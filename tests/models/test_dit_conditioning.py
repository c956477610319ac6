"""The DiT paper's conditioning ablation (Sec. 3.2): adaLN-Zero, cross-attention, in-context tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models._pure import PureModel
from jaxdiff.models.dit import CONDITIONINGS, DiTConfig, DiTTransformer2DModel, dit_init, timestep_embedding

T = jnp.array([3.0, 500.0, 999.0])
_forward = jax.jit(lambda model, x, t, y: model(x, t, y))
LABELS = jnp.array([1, 4, 10])  # 10: the null class


def _config(conditioning: str) -> DiTConfig:
    return DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8,
                     patch_size=2, num_embeds_ada_norm=10, conditioning=conditioning)


def _random(conditioning: str, seed: int = 0) -> DiTTransformer2DModel:
    """Normal random weights everywhere (no zero-initialised piece hides the conditioning)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiTTransformer2DModel(_config(conditioning), rngs=nnx.Rngs(0))))
    state = jax.tree_util.tree_map(lambda a: np.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (3, 8, 8, 1))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_each_design_reads_the_label_and_the_time(conditioning, x):
    model = PureModel.of(_random(conditioning))
    # one batch of three: as given, other labels, later times
    both = _forward(model, jnp.concatenate([x, x, x]), jnp.concatenate([T, T, T + 100.0]),
                    jnp.concatenate([LABELS, jnp.array([2, 5, 0]), LABELS]))
    out, other, later = jnp.split(both, 3)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.min(jnp.max(jnp.abs(other - out), axis=(1, 2, 3)))) > 1e-3  # every sample moves
    assert float(jnp.min(jnp.max(jnp.abs(later - out), axis=(1, 2, 3)))) > 1e-3


def _by_hand(pure: PureModel, x, t, y):
    """In-context DiT written out: blocks on [time, class, patches], the final layer, then the first two dropped."""
    model = pure.module()
    emb = model.cond_embed
    temb = emb.timestep_embedder(timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1))
    h = jnp.concatenate([jnp.stack([temb, emb.class_embedder(y)], axis=1), model.pos_embed(x)], axis=1)
    for block in model.transformer_blocks:
        h = block(h, None)
    final = model.proj_out(model.norm_out(h))  # (3, 2 + 16, 4): 4x4 patches of 2x2 pixels
    to_image = lambda tok: tok.reshape(3, 4, 4, 2, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(3, 8, 8, 1)  # noqa: E731
    return to_image(final[:, 2:]), to_image(final[:, :16]), model(x, t, y)


def test_in_context_drops_the_two_condition_tokens(x):
    """The output is the final layer on the image tokens only, after the blocks ran on [time, class, patches]."""
    want, wrong, got = jax.jit(_by_hand)(PureModel.of(_random("in_context")), x, T, LABELS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(jnp.max(jnp.abs(wrong - want))) > 1e-2


def test_layouts_and_default():
    """adaLN-Zero keeps diffusers' names; the others have a shared embedder, plain blocks and one output layer."""
    names = {c: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(
        nnx.eval_shape(lambda c=c: DiTTransformer2DModel(_config(c), rngs=nnx.Rngs(0)))))} for c in CONDITIONINGS}
    assert DiTConfig().conditioning == "ada_norm_zero"
    assert "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.embedding" in names["ada_norm_zero"]
    assert not any(n.startswith("cond_embed") for n in names["ada_norm_zero"])
    assert "transformer_blocks.1.attn2.to_k.kernel" in names["cross_attention"]
    assert not any(".attn2." in n for n in names["in_context"])
    for c in ("cross_attention", "in_context"):
        assert {"cond_embed.class_embedder.embedding_table.embedding", "proj_out.kernel"} <= names[c]
    with pytest.raises(ValueError, match="conditioning"):
        DiTConfig(conditioning="film")


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_dit_init_starts_at_zero_output(conditioning, x):
    """The paper's initialisation: the output projection (and adaLN-Zero's gates) start at zero."""
    model = dit_init(_random(conditioning), seed=0)
    three = jnp.concatenate([x, x, x]), jnp.concatenate([T, T, T]), jnp.concatenate([LABELS] * 3)  # the shapes above
    assert float(jnp.max(jnp.abs(_forward(PureModel.of(model), *three)))) == 0.0
    kernel = model.transformer_blocks[0].attn1.to_q.kernel.get_value()
    assert 0 < float(jnp.std(kernel)) < 0.5
