"""AUTOMATIC1111-style hypernetworks: hand-built torch files, the MLPs against torch, a U-Net against diffusers
with the same context transform done in torch, strength 0, no recompiles, several chained, training and saving."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention_control as ac
from jaxdiff.models import hypernetwork as hnet
from jaxdiff.models._pure import PureModel

torch = pytest.importorskip("torch")

CASES = {  # layer_structure, activation (torch module), layer norm, activate_output, dropout_structure
    "relu_norm_dropout": ([1, 2, 1], "relu", torch.nn.ReLU, True, False, [0, 0.3, 0]),
    "swish_output_odd": ([1, 1.5, 1], "swish", torch.nn.Hardswish, False, True, None),
}


def _torch_mlp(width, structure, act, norm, activate_output, dropout, g):
    """A torch Sequential laid out as the format describes: Linear, activation (not after the last Linear unless
    activate_output), LayerNorm, Dropout; random weights and norms."""
    mods = []
    for i in range(len(structure) - 1):
        d_in, d_out = int(width * structure[i]), int(width * structure[i + 1])
        mods.append(torch.nn.Linear(d_in, d_out))
        if i < len(structure) - 2 or activate_output:
            mods.append(act())
        if norm:
            mods.append(torch.nn.LayerNorm(d_out))
        if dropout and dropout[i + 1] > 0:
            mods.append(torch.nn.Dropout(dropout[i + 1]))
    seq = torch.nn.Sequential(*mods)
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 and norm else 0.0))
    return seq.eval()


def _file(path, case: str, widths, seed=0):
    """torch.save of the format's dict (each module's Sequential is its ``linear`` attribute); returns the torch
    MLPs {width: (keys, values)}."""
    structure, name, act, norm, out, dropout = CASES[case]
    g = torch.Generator().manual_seed(seed)
    mlps = {w: tuple(_torch_mlp(w, structure, act, norm, out, dropout, g) for _ in range(2)) for w in widths}
    data = {w: [{f"linear.{k}": v for k, v in m.state_dict().items()} for m in pair] for w, pair in mlps.items()}
    data.update(layer_structure=structure, activation_func=name, is_layer_norm=norm, activate_output=out,
                use_dropout=dropout is not None, dropout_structure=dropout, last_layer_dropout=False,
                weight_initialization="Normal", name=case, step=7, sd_checkpoint=None, sd_checkpoint_name=None)
    torch.save(data, path)
    return mlps


@pytest.mark.parametrize("case", list(CASES))
def test_hand_built_file_equals_torch_mlps_and_round_trips_safetensors(tmp_path, case):
    mlps = _file(tmp_path / "h.pt", case, [12, 16])
    hn = hnet.load_hypernetwork(tmp_path / "h.pt")
    assert hn.widths == [12, 16] and hn.config["activation_func"] == CASES[case][1]
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    for strength in (1.0, 0.6):
        control = hnet.hypernetwork_control(hn, strength)
        ck, cv = control.context(jnp.asarray(x), jnp.asarray(x))
        with torch.no_grad():
            want = [torch.from_numpy(x) + strength * m(torch.from_numpy(x)) for m in mlps[16]]
        np.testing.assert_allclose(ck, want[0].numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(cv, want[1].numpy(), atol=1e-5, rtol=1e-5)
    other = np.ones((1, 3, 8), np.float32)  # no module of width 8: unchanged
    np.testing.assert_array_equal(hnet.hypernetwork_control(hn).context(other, other)[0], other)
    path = hnet.save_hypernetwork(tmp_path / "h.safetensors", hn)
    again = hnet.load_hypernetwork(path)
    assert again.options == hn.options
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(hn)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(hn)


def _hyper_processors(model, mlps, strength):
    """diffusers attention with the context transform done in torch: keys read ``c + s * f_k(c)`` and values
    ``c + s * f_v(c)`` when ``c``'s width has MLPs (``c`` the text, or the hidden states in self-attention)."""
    from diffusers.models.attention_processor import Attention

    class Hyper:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
            assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
            assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and attention_mask is None
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            ck = cv = ctx
            if ctx.shape[-1] in mlps:
                fk, fv = mlps[ctx.shape[-1]]
                ck, cv = ctx + strength * fk(ctx), ctx + strength * fv(ctx)
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key, value = attn.head_to_batch_dim(attn.to_k(ck)), attn.head_to_batch_dim(attn.to_v(cv))
            out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, key, None), value))
            return attn.to_out[1](attn.to_out[0](out))

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(Hyper())


UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
"""Self-attention 8 wide (outer blocks) and 16 wide (mid block), text 12 wide."""


@pytest.mark.parity
def test_unet_with_hypernetwork_equals_diffusers_strength_zero_is_plain_and_compiles_once(tmp_path):
    """Modules for widths 12 and 16 act on every cross-attention layer and on the mid block's 16-wide
    self-attention, not on the 8-wide ones, as diffusers with the transform done in torch; strength 0 is the
    plain U-Net bit for bit, and new strengths reuse the compiled program."""
    pytest.importorskip("diffusers")
    from jaxdiff.models import unet
    from tests.models.fixtures import make_unet

    ref = make_unet.build("unet", UNET, 3)
    mlps = _file(tmp_path / "h.pt", "relu_norm_dropout", [12, 16], seed=1)
    hn = hnet.load_hypernetwork(tmp_path / "h.pt")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        plain_ref = ref(x, t, ctx).sample.numpy()
        _hyper_processors(ref, mlps, 0.8)
        want = ref(x, t, ctx).sample.numpy()
    assert np.abs(want - plain_ref).max() > 1e-2  # the transform matters
    weights = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = PureModel.of(unet.from_pretrained_tensors(dict(ref.config), weights))
    call = jax.jit(lambda m, c, *args: m(*args, control=c))
    args = (jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    got = call(model, hnet.hypernetwork_control(hn, 0.8), *args)
    np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), want, atol=1e-4)
    compiled = call._cache_size()
    zero = call(model, hnet.hypernetwork_control(hn, 0.0), *args)
    other = call(model, hnet.hypernetwork_control(hn, 0.3), *args)
    assert call._cache_size() == compiled  # new strengths: the same program
    plain = jax.jit(lambda m, *args: m(*args))(model, *args)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))
    assert np.abs(np.asarray(other) - np.asarray(plain)).max() > 1e-3


def test_several_hypernetworks_chain_in_order():
    """The second hypernetwork transforms the first one's keys and values (at every matching site)."""
    hn = hnet.init_hypernetwork([8], activation="relu", layer_norm=True, std=0.5, seed=1)
    hn2 = hnet.init_hypernetwork([8], std=0.5, seed=2)
    c = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 8)), jnp.float32)
    transform = hnet.hypernetworks((hn, 0.5), (hn2, 0.7))
    run = ac.ControlRun(transform.params["control"])  # the composed attention control
    k1, v1 = hnet.hypernetwork_control(hn, 0.5).context(c, c)
    k2, v2 = hnet.hypernetwork_control(hn2, 0.7).context(k1, v1)
    for site in (ac.Site("mid_block.attentions.0.transformer_blocks.0.attn1", "self", 1), ac.Site("y", "cross", 1)):
        for got, want in zip(run.context(site, None, c), (k2, v2)):
            np.testing.assert_array_equal(got, want)
    assert np.abs(np.asarray(k2) - np.asarray(c)).max() > 1e-3


# ---- training on the Stable Diffusion recipe (the tiny JAX model) ------------------------------------------


def test_train_on_a_frozen_model_save_reload(tmp_path):
    from tests.pipelines import _tiny_sd

    sd = _tiny_sd.build(tmp_path / "tok")
    latents = np.random.default_rng(3).standard_normal((4, 4, 4, 4)).astype(np.float32)
    start = hnet.init_hypernetwork([8], layer_structure=(1, 2, 1), activation="relu", layer_norm=True, seed=4)
    hn, losses = hnet.train_hypernetwork(sd, None, ["a", "b", "c", "a b"], hypernetwork=start, steps=2,
                                         learning_rate=1e-2, batch_size=2, latents=latents)
    assert losses.shape == (2,) and np.all(np.isfinite(losses))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree_util.tree_leaves(hn), jax.tree_util.tree_leaves(start))]
    assert min(moved) > 0  # every weight, bias and norm of the MLPs was trained
    assert hn.num_params() == 2 * (8 * 16 + 16 + 2 * 16 + 16 * 8 + 8 + 2 * 8)
    path = hnet.save_hypernetwork(tmp_path / "trained.safetensors", hn)
    again = hnet.load_hypernetwork(path)  # the same pytree, bit for bit: the same images
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(hn)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(hn)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_novelai_layout_and_bad_files(tmp_path):
    """The original NovelAI modules (``linear1`` / ``linear2``: a [1, 2, 1] linear MLP) load; a module that does
    not return to its width, an unknown activation or a stray entry are clear errors."""
    g = torch.Generator().manual_seed(5)
    lin1, lin2 = torch.nn.Linear(12, 24), torch.nn.Linear(24, 12)
    state = {f"linear{i}.{k}": v for i, m in ((1, lin1), (2, lin2)) for k, v in m.state_dict().items()}
    torch.save({12: [state, state]}, tmp_path / "nai.pt")
    hn = hnet.load_hypernetwork(tmp_path / "nai.pt")
    x = torch.randn(1, 3, 12, generator=g)
    with torch.no_grad():
        want = (x + lin2(lin1(x))).numpy()
    np.testing.assert_allclose(hnet.hypernetwork_control(hn).context(x.numpy(), x.numpy())[0], want, atol=1e-5)
    bad = {12: [{"linear.0.weight": torch.zeros(24, 12), "linear.0.bias": torch.zeros(24)}] * 2}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(hnet.HypernetworkFormatError, match="ends at width 24"):
        hnet.load_hypernetwork(tmp_path / "bad.pt")
    torch.save({12: [state, state], "activation_func": "prelu"}, tmp_path / "act.pt")
    with pytest.raises(hnet.HypernetworkFormatError, match="activation 'prelu' is not supported"):
        hnet.load_hypernetwork(tmp_path / "act.pt")
    torch.save({12: [{**state, "scale": torch.ones(1)}, state]}, tmp_path / "stray.pt")
    with pytest.raises(hnet.HypernetworkFormatError, match="unexpected entry 'scale'"):
        hnet.load_hypernetwork(tmp_path / "stray.pt")
