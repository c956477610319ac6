"""AUTOMATIC1111-style hypernetworks: hand-built torch files, the MLPs against torch, strength 0, several chained,
training and saving (the Stable Diffusion images against diffusers: tests/pipelines/test_textual_inversion_parity.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention_control as ac
from jaxdiff.models import hypernetwork as hnet

torch = pytest.importorskip("torch")
from tests.models._hypernetwork_files import CASES, write_file  # noqa: E402

@pytest.mark.parametrize("case", list(CASES))
def test_hand_built_file_equals_torch_mlps_and_round_trips_safetensors(tmp_path, case):
    mlps = write_file(tmp_path / "h.pt", case, [12, 16])
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
    for got in hnet.hypernetwork_control(hn, 0.0).context(jnp.asarray(x), jnp.asarray(x)):
        np.testing.assert_array_equal(got, x)  # strength 0: the context itself, bit for bit
    other = np.ones((1, 3, 8), np.float32)  # no module of width 8: unchanged
    np.testing.assert_array_equal(hnet.hypernetwork_control(hn).context(other, other)[0], other)
    path = hnet.save_hypernetwork(tmp_path / "h.safetensors", hn)
    again = hnet.load_hypernetwork(path)
    assert again.options == hn.options
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(hn)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(hn)


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
    again = hnet.load_hypernetwork(path)  # the same pytree, bit for bit
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(hn)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(hn)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the denoiser: the reloaded hypernetwork gives the same outputs; strength 0 is the plain model bit for bit
    x, sigma = jnp.asarray(latents[:2]) * 3.0, jnp.asarray([0.5, 8.0])
    cond = {"context": sd.encode_prompt(["a b", "c"])}
    hyper = jax.jit(lambda m, h, s: m.denoiser(network_transform=hnet.hypernetworks((h, s)))(x, sigma, cond))
    trained = hyper(sd.models, hn, 1.0)
    np.testing.assert_array_equal(hyper(sd.models, again, 1.0), trained)
    plain = jax.jit(lambda m: m.denoiser()(x, sigma, cond))(sd.models)
    np.testing.assert_array_equal(hyper(sd.models, hn, 0.0), plain)
    assert np.abs(np.asarray(trained) - np.asarray(plain)).max() > 1e-4


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
