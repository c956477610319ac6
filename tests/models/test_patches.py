"""Weight patches (LoRA, full deltas), per-call patched networks and growable embedding tables.

Truth: the PyTorch models (diffusers' tiny U-Net, transformers' tiny CLIP text model) whose weights are
patched by hand in torch, ``W + scale * alpha / r * up @ down``; checkpoint names are those diffusers and
transformers save.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import conditioning
from jaxdiff._pytree import pytree_dataclass
from jaxdiff.convert.torch_layout import checkpoint_name, state_name, state_path, to_torch_layout
from jaxdiff.models import patches, unet
from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import CLIPTextModel
from flax import nnx
from tests.models._convnet_cases import apply, assert_close, load_case, nchw, nhwc
from tests.models._textdit_cases import DATA, fx


# ---- checkpoint names <-> state paths ------------------------------------------------------------------

def _round_trip(model, file_tensors: dict, rename) -> None:
    by_model_name = {(rename(k) if rename else k): k for k in file_tensors}
    state = nnx.state(model)
    seen = set()
    for path, var in nnx.to_flat_state(state):
        name = checkpoint_name(path)
        assert name in by_model_name, name
        assert checkpoint_name(state_name(path)) == name
        assert state_path(name, state) == path
        np.testing.assert_array_equal(to_torch_layout(np.asarray(var.get_value()), str(path[-1])),
                                      file_tensors[by_model_name[name]], err_msg=name)
        seen.add(by_model_name[name])
    assert seen == set(file_tensors) - {k for k in file_tensors if k.endswith("position_ids")}


def test_every_unet_parameter_has_its_diffusers_name_and_layout():
    config, weights, _ = load_case("unet_sd1")
    _round_trip(unet.from_pretrained_tensors(config, weights), weights, None)


def test_every_clip_text_parameter_has_its_transformers_name_and_layout():
    config, tensors, _, _ = fx.load_case(DATA / "clip_text_quick_gelu")
    _round_trip(CLIPTextModel.from_pretrained_tensors(config, tensors), tensors, CLIPTextModel.rename_torch_key)


def test_state_path_names_the_missing_parameter():
    config, weights, _ = load_case("unet_sd1")
    with pytest.raises(KeyError, match="conv_in.wieght"):
        state_path("conv_in.wieght", nnx.state(unet.from_pretrained_tensors(config, weights)))


# ---- LoRA on the U-Net against diffusers ------------------------------------------------------------------

# target module -> (rank, alpha, file layout); linear layers, a 1x1 conv, 3x3 convs (LoRA-conv form)
UNET_TARGETS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (2, 1.0, "peft"),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (3, 6.0, "kohya"),
    "down_blocks.0.attentions.0.proj_in": (2, 3.0, "kohya"),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (4, None, "peft"),
    "down_blocks.0.resnets.0.conv1": (3, 1.5, "kohya"),
    "up_blocks.1.resnets.0.conv1": (2, None, "peft"),
    "time_embedding.linear_1": (2, 2.0, "peft"),
}


def _lora_file(torch_model, targets: dict, prefix: str, seed: int) -> dict[str, np.ndarray]:
    """Random LoRA tensors for ``targets`` in the file layouts LoRA files use (PyTorch names and layouts)."""
    params = dict(torch_model.named_parameters())
    rng = np.random.default_rng(seed)
    out = {}
    for module, (rank, alpha, layout) in targets.items():
        w = params[module + ".weight"].detach().numpy()
        if w.ndim == 2:
            down, up = rng.standard_normal((rank, w.shape[1])), rng.standard_normal((w.shape[0], rank))
        else:  # LoRA-conv: a conv with the layer's kernel, then a 1x1 conv
            down = rng.standard_normal((rank, w.shape[1], *w.shape[2:]))
            up = rng.standard_normal((w.shape[0], rank, 1, 1))
        down, up = (0.3 * down).astype(np.float32), (0.3 * up).astype(np.float32)
        names = ("lora_A.weight", "lora_B.weight") if layout == "peft" else ("lora_down.weight", "lora_up.weight")
        out[f"{prefix}{module}.{names[0]}"], out[f"{prefix}{module}.{names[1]}"] = down, up
        if alpha is not None:
            out[f"{prefix}{module}.alpha"] = np.float32(alpha)
    return out


def _patch_torch_by_hand(torch_model, lora_file: dict, prefix: str, scale: float) -> None:
    """``W += scale * alpha / r * up @ down`` (convs: ``sum_r up[o, r] down[r, i, y, x]``) on the torch model."""
    import torch

    params = dict(torch_model.named_parameters())
    ours = [k[len(prefix):] for k in lora_file if k.startswith(prefix) and not k.endswith(".alpha")]
    modules = {k.rsplit(".", 2)[0] for k in ours}
    with torch.no_grad():
        for module in modules:
            get = lambda *names: next(lora_file[f"{prefix}{module}.{n}"] for n in names  # noqa: E731
                                      if f"{prefix}{module}.{n}" in lora_file)
            down, up = get("lora_A.weight", "lora_down.weight"), get("lora_B.weight", "lora_up.weight")
            rank = down.shape[0]
            alpha = float(lora_file.get(f"{prefix}{module}.alpha", rank))
            delta = np.einsum("or,ri...->oi...", up.reshape(up.shape[:2]).astype(np.float64), down)
            params[module + ".weight"].add_(torch.from_numpy((scale * alpha / rank * delta).astype(np.float32)))


@pytree_dataclass
class _Net:
    """``net(x, t, cond)`` around a U-Net PureModel (what the SD recipe's UNetNet does)."""

    unet: PureModel

    def __call__(self, x, t, cond):
        return self.unet(x, t, cond["context"])


@pytest.mark.parity
def test_lora_on_the_unet_equals_diffusers_patched_by_hand():
    """Merged (``merge``) and per-call (``patch_weights``) LoRA equal diffusers with the same LoRA added to its
    weights by hand, at two scales; a new scale, or scale 0 (off), reuses the compiled program."""
    pytest.importorskip("diffusers")
    from tests.models.fixtures import make_unet

    torch_model = make_unet.build("unet", make_unet.UNET_SD1, 0)
    weights = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    io = {k: v.detach().numpy() for k, v in make_unet.unet_io(torch_model, make_unet.UNET_SD1, 100).items()}
    config, _, _ = load_case("unet_sd1")
    model = PureModel.of(unet.from_pretrained_tensors(config, weights))
    lora_file = {**_lora_file(torch_model, UNET_TARGETS, "unet.", 0), "text_encoder.x.lora_A.weight": np.ones(1)}
    patch = patches.lora(lora_file, model, prefix="unet.")
    assert sorted(checkpoint_name(n) for n in patch.names()) == sorted(m + ".weight" for m in UNET_TARGETS)

    x, t, ctx = nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"]
    base = nchw(apply(model, x, t, ctx))  # the U-Net parity tests' program (same shapes: compiled once per session)
    assert_close(base, io["out"], rel=1e-5)
    import torch

    _patch_torch_by_hand(torch_model, lora_file, "unet.", 0.7)  # the truth: diffusers with W + 0.7 * delta
    with torch.no_grad():
        expected = torch_model(*(torch.from_numpy(io[k]) for k in ("sample", "timesteps", "encoder_hidden_states")))
    expected = expected.sample.numpy()
    assert np.abs(expected - io["out"]).max() > 1e-2  # the patch matters

    net = _Net(model)
    step = jax.jit(lambda net, x, t, cond: net(x, t, cond))
    for scale in (0.7, -1.3):
        merged = nchw(apply(patches.merge(model, patch, scale), x, t, ctx))
        per_call = nchw(step(conditioning.apply(net, patches.patch_weights(patch, scale)), x, t, {"context": ctx}))
        assert_close(per_call, merged, rel=1e-5)
        if scale == 0.7:
            assert_close(merged, expected, rel=1e-5)
        else:
            assert np.abs(merged - expected).max() > 1e-2  # the scale took effect
    off = nchw(step(conditioning.apply(net, patches.patch_weights(patch, 0.0)), x, t, {"context": ctx}))
    assert_close(off, base, rel=1e-6)
    assert step._cache_size() == 1  # one program for every scale, the patch turned off included


# ---- LoRA and full deltas on CLIP against transformers ----------------------------------------------------

# transformers 5 names CLIPTextModel's parameters without the ``text_model.`` prefix: rename= maps them
CLIP_TARGETS = {
    "encoder.layers.0.self_attn.q_proj": (2, 4.0, "peft"),
    "encoder.layers.1.mlp.fc1": (3, None, "kohya"),
    "encoder.layers.2.self_attn.out_proj": (1, 0.5, "peft"),
}
CLIP_DELTAS = ("embeddings.token_embedding.weight", "final_layer_norm.weight",
               "encoder.layers.1.mlp.fc2.weight", "encoder.layers.0.self_attn.k_proj.bias")


def _clip_live():
    pytest.importorskip("transformers")
    torch_model, inputs, _ = fx.build("clip_text_quick_gelu")
    weights = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    model = PureModel.of(CLIPTextModel.from_pretrained_tensors(torch_model.config.to_dict(), weights))
    return torch_model, model, inputs["input_ids"]


def _torch_text(torch_model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        out = torch_model(torch.from_numpy(np.asarray(ids, np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@jax.jit
def _text(model: PureModel, ids):
    out = model(ids)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parity
def test_lora_and_full_delta_on_clip_equal_transformers_patched_by_hand():
    import torch

    torch_model, model, ids = _clip_live()
    lora_file = _lora_file(torch_model, CLIP_TARGETS, "", 1)
    rng = np.random.default_rng(2)
    params = dict(torch_model.named_parameters())
    deltas = {k: (0.2 * rng.standard_normal(params[k].shape)).astype(np.float32) for k in CLIP_DELTAS}
    scale = 0.8
    _patch_torch_by_hand(torch_model, lora_file, "", scale)
    with torch.no_grad():
        for k, d in deltas.items():
            params[k].add_(torch.from_numpy(scale * d))
    expected = _torch_text(torch_model, ids)

    rename = CLIPTextModel.rename_torch_key
    merged = patches.merge(patches.merge(model, patches.lora(lora_file, model, rename=rename), scale),
                           patches.full_delta(deltas, model, rename=rename), scale)
    for got, want in zip(_text(merged, ids), expected):
        fx.assert_close(got, want, "clip lora")
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_mismatched_patches_are_refused_in_one_error_listing_them():
    config, tensors, _, _ = fx.load_case(DATA / "clip_text_quick_gelu")
    model = PureModel.of(CLIPTextModel.from_pretrained_tensors(config, tensors))
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    bad = {
        f"{q}.lora_A.weight": np.ones((2, 32), np.float32), f"{q}.lora_B.weight": np.ones((32, 2), np.float32),  # fine
        "text_model.encoder.layers.9.mlp.fc1.lora_A.weight": np.ones((2, 32), np.float32),  # no such layer
        "text_model.encoder.layers.9.mlp.fc1.lora_B.weight": np.ones((48, 2), np.float32),
        "text_model.encoder.layers.1.mlp.fc1.lora_A.weight": np.ones((2, 31), np.float32),  # wrong width
        "text_model.encoder.layers.1.mlp.fc1.lora_B.weight": np.ones((48, 2), np.float32),
        "text_model.encoder.layers.2.mlp.fc2.lora_A.weight": np.ones((2, 48), np.float32),  # half a pair
        "text_model.encoder.layers.2.mlp.fc2.magnitude": np.ones(3, np.float32),  # unknown layout
    }
    with pytest.raises(patches.PatchMismatchError) as err:
        patches.lora(bad, model)
    msg = str(err.value)
    for what in ("layers.9.mlp.fc1: no such layer", "layers.1.mlp.fc1.weight: patch (31, 48), model (32, 48)",
                 "layers.2.mlp.fc2: has only the down matrix", "fc2.magnitude: not a LoRA tensor"):
        assert what in msg, msg
    assert "q_proj" not in msg
    with pytest.raises(patches.PatchMismatchError, match="final_layer_norm.weight: patch"):
        patches.full_delta({"text_model.final_layer_norm.weight": np.ones(31, np.float32)}, model)
    # a patch for another model: merge refuses it whole; the per-call form refuses it at trace time
    config_u, weights_u, _ = load_case("unet_sd1")
    other = PureModel.of(unet.from_pretrained_tensors(config_u, weights_u))
    good = patches.lora({k: v for k, v in bad.items() if k.startswith(q)}, model)
    with pytest.raises(patches.PatchMismatchError, match="q_proj.weight: no such parameter"):
        patches.merge(other, good)
    with pytest.raises(patches.PatchMismatchError, match="q_proj.weight: no such parameter"):
        jax.eval_shape(conditioning.apply(_Net(other), patches.patch_weights(good, 1.0)), jnp.zeros((1, 8, 8, 4)),
                       jnp.zeros((1,)), {"context": jnp.zeros((1, 5, 12))})


def test_a_patch_that_fits_two_models_asks_which():
    config, weights, _ = load_case("unet_sd1")
    a = PureModel.of(unet.from_pretrained_tensors(config, weights))
    name = "conv_in.weight"
    patch = patches.full_delta({name: np.ones(weights[name].shape, np.float32)}, a)

    @pytree_dataclass
    class Two:
        a: PureModel
        b: PureModel

        def __call__(self, x, t, cond):
            return self.a(x, t, cond["context"]) + self.b(x, t, cond["context"])

    args = (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), {"context": jnp.zeros((1, 5, 12))})
    with pytest.raises(patches.PatchMismatchError, match="fits 2 models"):
        jax.eval_shape(conditioning.apply(Two(a, a), patches.patch_weights(patch, 1.0)), *args)
    chosen = conditioning.apply(Two(a, a), patches.patch_weights(patch, 1.0, model=unet.UNet2DConditionModel))
    jax.eval_shape(chosen, *args)  # a class selects the model (here both are U-Nets: both patched)


# ---- growable token-embedding tables against transformers' resize_token_embeddings ---------------------------

TABLE = "text_model.embeddings.token_embedding.weight"


@pytest.mark.parity
def test_added_tokens_keep_shapes_and_equal_transformers_resized_embeddings():
    import torch

    torch_model, model, ids = _clip_live()
    vocab, dim = 64, 32
    plain = _text(model, ids)
    padded = patches.pad_embedding(model, TABLE, 80)
    assert padded.state["text_model"]["embeddings"]["token_embedding"]["embedding"].shape == (80, dim)
    for got, want in zip(_text(padded, ids), plain):  # in-vocabulary ids read the same rows
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    rows = np.random.default_rng(3).standard_normal((2, dim)).astype(np.float32)
    torch_model.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        torch_model.get_input_embeddings().weight[vocab:] = torch.from_numpy(rows)
    new_ids = ids.copy()
    new_ids[0, 2], new_ids[1, 4], new_ids[1, 6] = vocab, vocab, vocab + 1

    before = _text._cache_size()  # the padded table's program (in-vocabulary ids) is compiled
    one = patches.set_embedding_rows(padded, TABLE, rows[:1], vocab)
    first = _text(one, new_ids)
    two = patches.set_embedding_rows(one, TABLE, rows[1:], vocab + 1)  # a second token: values change, shapes don't
    got = _text(two, new_ids)
    assert _text._cache_size() == before  # adding tokens compiled nothing
    np.testing.assert_array_equal(np.asarray(first[0])[0], np.asarray(got[0])[0])  # row 0 has no token 65
    assert np.abs(np.asarray(first[0])[1] - np.asarray(got[0])[1]).max() > 1e-3  # row 1 reads the new row 65
    want = _torch_text(torch_model, new_ids)
    fx.assert_close(got[0], want[0], "last_hidden_state with added tokens")
    # legacy config (eos_token_id == 2): pooling takes argmax(input_ids), i.e. the highest new token, not EOS
    fx.assert_close(got[1], want[1], "pooler_output with added tokens")
    # pooled at the new token (to float32 rounding: XLA may compute the gathered row in its own fusion)
    np.testing.assert_allclose(np.asarray(got[1])[1], np.asarray(got[0])[1, 6], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pad it first"):
        patches.set_embedding_rows(padded, TABLE, rows, 79)


def test_kohya_underscored_names_find_the_same_layers():
    """``lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight`` names the dotted layer."""
    config, tensors, _, _ = fx.load_case(DATA / "clip_text_quick_gelu")
    model = PureModel.of(CLIPTextModel.from_pretrained_tensors(config, tensors))
    rng = np.random.default_rng(5)
    dotted, kohya = {}, {}
    for module, (din, dout) in {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
                                "text_model.encoder.layers.2.mlp.fc2": (48, 32)}.items():
        values = {"lora_down.weight": rng.standard_normal((2, din)).astype(np.float32),
                  "lora_up.weight": rng.standard_normal((dout, 2)).astype(np.float32), "alpha": np.float32(1.0)}
        for suffix, value in values.items():
            dotted[f"{module}.{suffix}"] = value
            kohya[f"lora_te_{module.replace('.', '_')}.{suffix}"] = value
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    a, b = patches.lora(dotted, model), patches.lora(kohya, model, prefix="lora_te_")
    assert a.names() == b.names() == ["text_model.encoder.layers.0.self_attn.q_proj.kernel",
                                      "text_model.encoder.layers.2.mlp.fc2.kernel"]
    for n in a.names():
        np.testing.assert_array_equal(np.asarray(a.low_rank[n].delta()), np.asarray(b.low_rank[n].delta()))
    # the delta is (alpha / r) up @ down, in jaxdiff's (in, out) layout
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    want = 0.5 * (dotted[f"{q}.lora_up.weight"] @ dotted[f"{q}.lora_down.weight"]).T
    np.testing.assert_allclose(np.asarray(a.low_rank[q + ".kernel"].delta()), want, rtol=1e-6, atol=1e-6)
