"""Attention control: sites, probabilities against diffusers, edits against hand-built references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff import pytree_dataclass, sampling, samplers, schedules
from jaxdiff.conditioning import apply as apply_net
from jaxdiff.models import attention_control as ac
from jaxdiff.models import controlnet, dit, unet
from jaxdiff.models._pure import PureModel
from jaxdiff.models.attention import attention
from jaxdiff.models.layers import Maker
from jaxdiff.models.layers.transformer import Attention
from tests.models._convnet_cases import load_case, nhwc
from tests.models._textdit_cases import DATA, fx

_call = jax.jit(lambda model, args, control, records: model(*args, control=control, return_records=records),
                static_argnums=3)


def run(model, *args, control=None, return_records=False):
    """One jit for every model call here (weights, inputs and controls are traced arguments)."""
    return _call(PureModel.of(model) if isinstance(model, nnx.Module) else model, args, control, return_records)


def _sd1():
    config, weights, io = load_case("unet_sd1")
    return unet.from_pretrained_tensors(config, weights), (nhwc(io["sample"]), io["timesteps"],
                                                            io["encoder_hidden_states"])


# ---- diffusers parity -------------------------------------------------------------------------------

def _storing_processors(model, store: dict) -> None:
    """Install at every attention layer (path: its module name, as in ``unet.attn_processors``) a diffusers
    ``AttnProcessor`` that also keeps ``attention_probs`` as (B, heads, Tq, Tk)."""
    from diffusers.models.attention_processor import Attention as TorchAttention, AttnProcessor

    class Storing(AttnProcessor):
        def __init__(self, name: str):
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            assert attention_mask is None and attn.spatial_norm is None
            hs = hidden_states
            if hs.ndim == 4:  # the pixel U-Net's spatial attention: (B, C, H, W) -> (B, HW, C), then its GroupNorm
                hs = hs.flatten(2).transpose(1, 2)
            if attn.group_norm is not None:
                hs = attn.group_norm(hs.transpose(1, 2)).transpose(1, 2)
            ctx = hs if encoder_hidden_states is None else encoder_hidden_states
            q, k = attn.head_to_batch_dim(attn.to_q(hs)), attn.head_to_batch_dim(attn.to_k(ctx))
            p = attn.get_attention_scores(q, k, None)
            b, tq, tk = hs.shape[0], q.shape[1], k.shape[1]
            store[self.name] = p.reshape(b, attn.heads, tq, tk).detach().numpy()
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    for name, module in model.named_modules():
        if isinstance(module, TorchAttention):
            module.set_processor(Storing(name))


def _weights(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _compare_records(jax_model, call, torch_store: dict) -> None:
    """Every site's records equal diffusers' stored probabilities (<= 1e-5): per head at the self-attention
    sites, averaged over heads at the cross-attention ones (one call); each map sums to 1 over keys."""
    paths = [s.path for s in ac.sites(jax_model)]
    assert sorted(paths) == sorted(torch_store), "jaxdiff sites != diffusers' attention modules"
    _, rec = call(ac.compose(ac.Record(ac.SELF, per_head=True), ac.Record(ac.CROSS)))
    assert sorted(rec) == sorted(paths)
    for site in ac.sites(jax_model):
        want = torch_store[site.path] if site.kind == "self" else torch_store[site.path].mean(axis=1)
        assert torch_store[site.path].shape[1] == site.heads
        np.testing.assert_allclose(rec[site.path], want, atol=1e-5, rtol=0, err_msg=site.path)
        np.testing.assert_allclose(np.asarray(rec[site.path]).sum(-1), 1.0, atol=1e-5, err_msg=site.path)


def _reference(kind: str, cfg: dict, seed: int):
    """The diffusers model ``kind`` of tests/models/fixtures/make_unet.py with storing processors: (model, store)."""
    from tests.models.fixtures import make_unet

    ref = make_unet.build(kind, cfg, seed)
    store: dict = {}
    _storing_processors(ref, store)
    return ref, store


def _checked(model, args: tuple, expected: np.ndarray):
    """``call(control) -> (out, records)`` that also checks the output against diffusers' (recording is exact)."""
    def call(control):
        out, rec = run(model, *args, control=control, return_records=True)
        np.testing.assert_allclose(np.transpose(out, (0, 3, 1, 2)), expected, atol=1e-4)
        return out, rec

    return call


@pytest.mark.parity
def test_unet_records_equal_diffusers_attention_probs_at_every_site():
    """SD 2 style tiny U-Net (linear projection, per-block heads, two transformer layers in a block,
    a 6x10 latent): every site's probabilities as diffusers' default processor forms them."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests.models.fixtures import make_unet

    cfg = make_unet.UNET_SD2_DEPTH
    ref, store = _reference("unet", cfg, 1)
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, cfg["in_channels"], 6, 10, generator=g), torch.randn(2, 5, 12, generator=g), \
        torch.tensor([3.0, 700.0])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample.numpy()
    model = unet.from_pretrained_tensors(dict(ref.config), _weights(ref))
    _compare_records(model, _checked(model, (nhwc(x.numpy()), t.numpy(), ctx.numpy()), expected), store)
    assert {s.kind for s in ac.sites(model)} == {"self", "cross"}
    assert ac.sites(model)[2].path == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parity
def test_pixel_unet_records_equal_diffusers_attention_probs_at_every_site():
    """The pixel U-Net's spatial self-attention (GroupNorm first; 6 and 12 heads of size 5 on 32 / 64
    channels): every site, including the mid block's, as diffusers forms the probabilities."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from jaxdiff.models import unet2d
    from tests.models.fixtures import make_unet

    cfg = make_unet.UNET2D_ODD_HEAD_DIM
    ref, store = _reference("unet2d", cfg, 4)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, cfg["in_channels"], 8, 8, generator=g), torch.tensor([5.0, 600.0])
    with torch.no_grad():
        expected = ref(x, t).sample.numpy()
    model = unet2d.from_pretrained_tensors(dict(ref.config), _weights(ref))
    _compare_records(model, _checked(model, (nhwc(x.numpy()), t.numpy()), expected), store)
    assert {s.kind for s in ac.sites(model)} == {"self"} and "mid_block.attentions.0" in store


@pytest.mark.parity
def test_controlnet_records_equal_diffusers_attention_probs_at_every_site():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests.models.fixtures import make_unet

    cfg = make_unet.CONTROLNET_SD1
    ref, store = _reference("controlnet", cfg, 3)
    g = torch.Generator().manual_seed(1)
    x, ctx, image = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g), \
        torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([17.0, 500.0])
    with torch.no_grad():
        ref(x, t, ctx, controlnet_cond=image, return_dict=False)
    model = controlnet.from_pretrained_tensors(dict(ref.config), _weights(ref))
    args = (nhwc(x.numpy()), t.numpy(), ctx.numpy(), nhwc(image.numpy()))
    _compare_records(model, lambda c: run(model, *args, control=c, return_records=True), store)


@pytest.mark.parity
def test_dit_records_equal_diffusers_attention_probs_at_every_site():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    ref, inputs, _ = fx.build("dit_a")
    store: dict = {}
    _storing_processors(ref, store)
    with torch.no_grad():
        ref(torch.from_numpy(inputs["latents_nhwc"]).permute(0, 3, 1, 2), timestep=torch.from_numpy(inputs["timesteps"]),
            class_labels=torch.from_numpy(inputs["class_labels"]))
    model = dit.from_pretrained_tensors(dict(ref.config), _weights(ref))
    args = tuple(inputs[k] for k in ("latents_nhwc", "timesteps", "class_labels"))
    _compare_records(model, lambda c: run(model, *args, control=c, return_records=True), store)


# ---- sites are static graph data ---------------------------------------------------------------------

def test_sites_live_in_the_graphdef_and_survive_split_and_merge():
    model, _ = _sd1()
    graphdef, state = nnx.split(model)
    assert "Site(" not in str(jax.tree_util.tree_structure(state))  # not a Variable, not a leaf
    merged = nnx.merge(graphdef, state)
    assert ac.sites(merged) == ac.sites(model) and len(ac.sites(model)) == 14
    assert ac.sites(model)[-1] == ac.Site("up_blocks.2.attentions.1.transformer_blocks.0.attn2", "cross", 8)


# ---- the fast path is untouched -----------------------------------------------------------------------

def test_attention_layer_without_control_is_the_plain_kernel():
    """With no control the layer's program is ``to_out(attention(split(q), split(k), split(v)))``."""
    layer = Attention(16, Maker(nnx.Rngs(0), jnp.float32, jnp.float32), heads=2, dim_head=8, cross_attention_dim=12)
    x, ctx = jnp.ones((2, 6, 16)), jnp.ones((2, 5, 12))

    def reference(x, ctx):
        split = lambda a: a.reshape(*a.shape[:2], 2, 8)  # noqa: E731
        q, k, v = layer.to_q(x), layer.to_k(ctx), layer.to_v(ctx)
        out = attention(split(q), split(k), split(v))
        return layer.to_out[0](out.reshape(2, 6, 16))

    assert str(jax.make_jaxpr(layer)(x, ctx)) == str(jax.make_jaxpr(reference)(x, ctx))


def test_unet_program_is_unchanged_where_no_control_acts():
    model, args = _sd1()
    pure = PureModel.of(model)
    plain = jax.make_jaxpr(lambda m: m(*args))(pure)
    elsewhere = jax.make_jaxpr(lambda m: m(*args, control=ac.Set(where=ac.Where(resolution=3))))(pure)
    assert str(plain) == str(elsewhere)


# ---- edits against hand-built references --------------------------------------------------------------

class _MeanOfValues(nnx.Module):
    """What an attention layer computes when every query attends uniformly: ``to_out(mean_k v)``."""

    def __init__(self, attn: Attention):
        self.attn = attn

    def __call__(self, x, context=None, control=None, hw=None, bias=None):
        assert bias is None  # no logit bias in an SD U-Net
        v = self.attn.to_v(x if context is None else context)
        return self.attn.to_out[0](jnp.broadcast_to(v.mean(axis=1, keepdims=True), (*x.shape[:2], v.shape[-1])))


def _replaced(model: nnx.Module, path: str) -> nnx.Module:
    """A copy of ``model`` whose layer at ``path`` is :class:`_MeanOfValues` of the original."""
    copy = nnx.merge(*nnx.split(model))
    *parents, name = path.split(".")
    node = copy
    for p in parents:
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    setattr(node, name, _MeanOfValues(getattr(node, name)))
    return copy


def test_uniform_probabilities_at_a_site_equal_the_mean_of_values():
    """Set (uniform) at a cross- and a self-attention site == the model with those layers replaced by
    ``to_out(mean over keys of v)``, computed without the control code."""
    model, args = _sd1()
    paths = ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.2.attentions.0.transformer_blocks.0.attn1")
    out = run(model, *args, control=ac.Set(where=ac.Where(paths=paths)))
    expected = run(_replaced(_replaced(model, paths[0]), paths[1]), *args)
    print("uniform-set max abs diff", np.abs(np.asarray(out) - np.asarray(expected)).max())
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)
    assert np.abs(np.asarray(out) - np.asarray(run(model, *args))).max() > 1e-3  # the edit did something


def test_dit_uniform_set_and_records():
    config, tensors, inputs, _ = fx.load_case(DATA / "dit_a")
    model = dit.from_pretrained_tensors(config, tensors)
    args = tuple(inputs[k] for k in ("latents_nhwc", "timesteps", "class_labels"))
    path = "transformer_blocks.1.attn1"
    out, rec = run(model, *args, control=ac.compose(ac.Set(where=ac.Where(paths=(path,))), ac.Record()),
                   return_records=True)
    np.testing.assert_allclose(out, run(_replaced(model, path), *args), atol=2e-6, rtol=0)
    assert sorted(rec) == ["transformer_blocks.0.attn1", path]
    np.testing.assert_allclose(np.asarray(rec["transformer_blocks.0.attn1"]).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(rec[path], 1 / 16)  # recorded after the edit: uniform over the 4x4 patches
    _, at_grid = run(model, *args, control=ac.Record(where=ac.Where(resolution=4)), return_records=True)
    assert len(at_grid) == 2


def _probs(q, k):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytree_dataclass
class _Shift:
    """A pytree callable (a stand-in hypernetwork): ``c + offset``."""

    offset: jax.Array

    def __call__(self, c):
        return c + self.offset


def test_replace_reweight_add_and_hypernetwork_match_the_formulas():
    """Rows take other rows' maps, key columns scale per row, a map is added, keys/values read f(context)."""
    layer = Attention(16, Maker(nnx.Rngs(0), jnp.float32, jnp.float32), heads=2, dim_head=8, cross_attention_dim=12)
    rng = np.random.default_rng(0)
    x, ctx = rng.normal(size=(3, 6, 16)).astype(np.float32), rng.normal(size=(3, 5, 12)).astype(np.float32)
    rows, factors = np.array([0, 0, 1]), rng.uniform(0.5, 2, size=(3, 5)).astype(np.float32)
    delta = rng.normal(size=(3, 6, 5)).astype(np.float32)
    control = ac.compose(ac.Hypernetwork(k=_Shift(1.0), v=_Shift(-0.5)), ac.Replace(rows),
                         ac.Reweight(factors), ac.Add(delta))
    got = layer(x, ctx, ac.ControlRun(control))

    lin = lambda m, a: np.asarray(m(jnp.asarray(a)))  # noqa: E731
    split = lambda a: a.reshape(*a.shape[:2], 2, 8)  # noqa: E731
    p = _probs(split(lin(layer.to_q, x)), split(lin(layer.to_k, ctx + 1.0)))
    p = p[rows] * factors[:, None, None, :] + delta[:, None]
    out = np.einsum("bhqk,bkhd->bqhd", p, split(lin(layer.to_v, ctx - 0.5))).reshape(3, 6, 16)
    np.testing.assert_allclose(got, lin(layer.to_out[0], out), atol=1e-5)


def test_filters_select_kind_paths_and_resolution():
    site = ac.Site("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", 8)
    assert ac.Where(kind="cross", paths=("up_blocks.1",), resolution=(4, 6))(site, (4, 6))
    assert not ac.Where(paths=("up_blocks.10",))(site, (4, 6))  # a prefix is a whole path component
    assert not ac.Where(kind="self")(site, (4, 6))
    assert not ac.Where(resolution=4)(site, (4, 6)) and ac.Where(resolution=4)(site, (4, 4))
    assert not ac.Where(resolution=4)(site, None)
    with pytest.raises(TypeError, match="tuple of paths"):
        ac.Where(paths="up_blocks")


# ---- steps, compilation, the network transform --------------------------------------------------------

@pytree_dataclass
class _UNetDenoiser:
    """``x - sigma * eps(x, 100 sigma, text)`` with the attention control taken from ``cond``."""

    unet: PureModel
    text: jax.Array

    def __call__(self, x, sigma, cond=None):
        return x - sigma * self.unet(x, 100 * sigma, self.text, control=cond)


def test_step_ranged_edit_acts_only_inside_its_steps_under_sample():
    """``sample`` with an edit on steps [a, b) equals a hand-driven Euler loop that turns the edit on
    exactly at those steps (the loop sets no StepIndex: the edit is on for all or none of a call)."""
    model, (x, _, text) = _sd1()
    den = _UNetDenoiser(PureModel.of(model), jnp.asarray(text))
    sig = schedules.karras(6, 0.1, 2.0, capacity=6)
    x = jnp.asarray(x) * 2.0
    where = ac.Where(kind="cross", resolution=4)
    factors = jnp.asarray([[1.0, 3.0, 0.2, 1.0, 1.0]] * 2)  # per row: cond leaves carry the batch

    @jax.jit
    def step(x, sigma, sigma_next, on):
        edit = ac.Reweight(factors, where=where, steps=(0, jnp.where(on, 99, 0)))
        return samplers.Euler().step(lambda x_, s_: den(x_, s_, edit), (), x, sigma, sigma_next, None)[0]

    sampling.sample_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = sampling.sample_jit._cache_size()
    for a, b in [(2, 4), (1, 5)]:
        got = sampling.sample(den, samplers.Euler(), sig, x, 0, ac.Reweight(factors, where=where, steps=(a, b)))
        ref = x
        for i in range(6):
            ref = step(ref, sig.values[i], sig.values[i + 1], a <= i < b)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert sampling.sample_jit._cache_size() - before == 1  # the step range is a traced value
    plain = sampling.sample(den, samplers.Euler(), sig, x, 0, ac.Reweight(factors, where=where, steps=(0, 0)))
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-4


def test_changing_factors_rows_and_step_ranges_compiles_nothing_new():
    model, args = _sd1()
    pure = PureModel.of(model)
    f = jax.jit(lambda m, c: m(*args, control=c, return_records=True))
    outs = []
    for factors, steps, rows in [([1.0, 2.0, 1.0, 1.0, 1.0], (0, 10), [0, 1]), ([1.0, 0.5, 4.0, 1.0, 1.0], (0, 10), [0, 1]),
                                 ([1.0, 0.5, 4.0, 1.0, 1.0], (3, 10), [0, 1]), ([1, 2, 1, 1, 1], (0, 10), [1, 1])]:
        c = ac.compose(ac.Replace(rows, steps=steps), ac.Reweight(factors, steps=steps), ac.Record(ac.CROSS))
        outs.append(np.asarray(f(pure, c)[0]))
    assert f._cache_size() == 1
    for i in range(1, len(outs)):
        assert np.abs(outs[i] - outs[i - 1]).max() > 1e-4, i  # each change took effect


@pytree_dataclass
class _EchoNet:
    def __call__(self, x, t, cond):
        return cond["attention"]


def test_attention_control_transform_appends_to_the_control_in_cond():
    first, second = ac.Record(ac.CROSS), ac.Set(where=ac.SELF)
    net = apply_net(_EchoNet(), ac.attention_control(second))
    got = net(jnp.zeros(1), jnp.zeros(1), {"attention": first, "context": jnp.zeros(1)})
    assert got.items == (first, second)
    assert net(jnp.zeros(1), jnp.zeros(1), {}).items == (second,)
    with pytest.raises(TypeError, match="not an attention control"):
        ac.compose(lambda p: p)


def test_controlled_layer_keeps_the_compute_dtype_and_records_in_float32():
    layer = Attention(8, Maker(nnx.Rngs(0), jnp.bfloat16, jnp.bfloat16), heads=2, dim_head=4, cross_attention_dim=6)
    x, ctx = jnp.ones((1, 4, 8), jnp.bfloat16), jnp.ones((1, 3, 6), jnp.bfloat16)
    run_ = ac.start(ac.compose(ac.Record(), ac.Reweight(jnp.ones(3))))
    out = layer(x, ctx, run_)
    assert out.dtype == jnp.bfloat16 and layer(x, ctx, ac.start(ac.Record())).dtype == jnp.bfloat16
    (maps,) = run_.records.values()
    assert maps.dtype == jnp.float32 and maps.shape == (1, 4, 3)
