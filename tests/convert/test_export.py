"""jaxdiff networks written as transformers / diffusers folders: the reference libraries load them and agree,
and jaxdiff reads them back bit for bit."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert import abstract, load_model_folder, open_safetensors
from jaxdiff.convert.export import save_pretrained, torch_state_dict, write_safetensors
from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

TINY_UNET = dict(  # diffusers config.json keys (SD 1.x style cross-attention U-Net)
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
)


def random_module(ctor, seed: int) -> nnx.Module:
    """``ctor()`` built abstractly and filled with random values (norm scales near 1, the rest near 0): every
    parameter, zero-initialised layers included, is exercised, and nothing is initialised op by op."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract(ctor))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        value = var.get_value()
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(base + 0.2 * rng.standard_normal(value.shape), value.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tiny_clip(seed: int = 0) -> CLIPModel:
    cfg = CLIPConfig(
        CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=10, eos_token_id=49, hidden_act="gelu"),
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         image_size=8, patch_size=4),
        projection_dim=12, logit_scale_init_value=2.0)
    return random_module(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)), seed)


def assert_same_state(a: nnx.Module, b: nnx.Module) -> None:
    fa, fb = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = np.asarray(fa[path].get_value()), np.asarray(fb[path].get_value())
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def assert_close(got, want, tol: float, name: str = "") -> None:
    """max |got - want| <= tol * max(1, max |want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * max(1.0, float(np.abs(want).max())), f"{name}: max abs diff {err:.3g}"


def _ids_and_pixels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.full((3, 10), 49, np.int64)
    ids[:, :5] = rng.integers(0, 48, (3, 5))
    return ids, rng.standard_normal((2, 8, 8, 3)).astype(np.float32)


def test_clip_round_trip_is_bit_exact(tmp_path):
    model = tiny_clip()
    weights = save_pretrained(model, tmp_path)  # config from CLIPConfig.to_dict()
    assert weights.name == "model.safetensors"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["model_type"] == "clip"
    back = load_model_folder(tmp_path)
    assert isinstance(back, CLIPModel) and back.config == model.config
    assert_same_state(model, back)
    ids, pixels = _ids_and_pixels()  # the towers split off carry the same arrays
    np.testing.assert_array_equal(model.vision_tower()(jnp.asarray(pixels)).image_embeds,
                                  model.get_image_features(jnp.asarray(pixels)))
    np.testing.assert_array_equal(model.text_tower(projection=True)(jnp.asarray(ids)).text_embeds,
                                  model.get_text_features(jnp.asarray(ids)))
    with open_safetensors(weights) as tensors:  # PyTorch layouts: Linear (out, in), Conv (out, in, kh, kw)
        assert tensors.shapes["vision_model.embeddings.patch_embedding.weight"] == (16, 3, 4, 4)
        assert tensors.shapes["text_projection.weight"] == (12, 16)
        assert tensors.shapes["logit_scale"] == ()


@pytest.mark.parity
def test_transformers_loads_exported_clip_and_its_text_tower(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny_clip()
    save_pretrained(model, tmp_path / "clip")
    ref, info = transformers.CLIPModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mis-shaped
    ids, pixels = _ids_and_pixels()
    with torch.no_grad():
        t_ids, t_px = torch.from_numpy(ids), torch.from_numpy(pixels.transpose(0, 3, 1, 2))
        want = ref.eval()(input_ids=t_ids, pixel_values=t_px)
        want_text = ref.get_text_features(t_ids).pooler_output.numpy()
    out = jax.jit(lambda m, i, p: m(i, p))(PureModel.of(model), jnp.asarray(ids), jnp.asarray(pixels))
    assert_close(out.logits_per_image, want.logits_per_image.numpy(), 1e-5, "logits_per_image")
    assert_close(out.text_embeds, want.text_embeds.numpy(), 1e-5, "text_embeds")
    text_features = jax.jit(lambda m, i: m(i))(PureModel.of(model, "get_text_features"), jnp.asarray(ids))
    assert_close(text_features, want_text, 1e-5, "text features")

    tower = model.text_tower()  # Stable Diffusion's text_encoder: a CLIPTextModel folder
    save_pretrained(tower, tmp_path / "text")
    text, info = transformers.CLIPTextModel.from_pretrained(tmp_path / "text", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        hidden = text.eval()(input_ids=t_ids).last_hidden_state.numpy()
    last = jax.jit(lambda m, i: m(i).last_hidden_state)(PureModel.of(tower), jnp.asarray(ids))
    assert_close(last, hidden, 1e-5, "text tower")
    assert_close(want.text_model_output.last_hidden_state.numpy(), hidden, 1e-6, "same tower in both folders")


@pytest.mark.parity
def test_diffusers_loads_exported_unet(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    config = UNet2DConditionConfig.from_dict(TINY_UNET)
    model = random_module(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)), 1)
    weights = save_pretrained(model, tmp_path, {**TINY_UNET, "_class_name": "UNet2DConditionModel"})
    assert weights.name == "diffusion_pytorch_model.safetensors"
    ref, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, 12)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                          torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    got = jax.jit(lambda m, *a: m(*a))(PureModel.of(model), jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    assert_close(got, want, 1e-4, "unet")  # the project's U-Net parity bar
    assert_same_state(model, load_model_folder(tmp_path))


def test_bfloat16_export_and_safetensors_reader_agree(tmp_path):
    """bfloat16 tensors (which numpy's own writers cannot store) are read back by the reference reader."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = tiny_clip()
    save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    loaded = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    tensors = torch_state_dict(model)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        want = value.astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(loaded[name].float().numpy(), want, err_msg=name)
    half = load_model_folder(tmp_path, dtype=jnp.bfloat16)
    assert half.logit_scale[...].dtype == jnp.bfloat16


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="abstract"):
        torch_state_dict(abstract(lambda: CLIPModel(CLIPConfig(), rngs=nnx.Rngs(0))))
    linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass config_dict"):
        save_pretrained(linear, tmp_path)
    with pytest.raises(ValueError, match="library="):
        save_pretrained(linear, tmp_path, {"in_features": 2})
    with pytest.raises(ValueError, match="cannot store"):
        write_safetensors(tmp_path / "x.safetensors", {"a": np.zeros(2, np.complex128)})
