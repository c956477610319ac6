"""UNet3DConditionModel (space-time factorised video U-Net) against diffusers, and its frame-wise mode."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert import load_model_folder
from jaxdiff.convert.export import save_pretrained
from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models import attention_control as ac
from jaxdiff.models import unet3d
from jaxdiff.models._pure import PureModel
from jaxdiff.models.layers.temporal import TemporalConvLayer, TransformerTemporalModel
from tests.models._convnet_cases import assert_close, reference_param_count

# Tiny configs: cross-attention stages (spatial + temporal transformers) and plain stages (resnets and
# temporal convs only; the mid block always cross-attends). 8-wide heads: 4 heads at 32 channels, 8 at 64.
BASE = dict(in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=16, attention_head_dim=8)
CONFIGS = {
    "cross": dict(BASE, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
                  up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"]),
    "plain": dict(BASE, down_block_types=["DownBlock3D", "DownBlock3D"], up_block_types=["UpBlock3D", "UpBlock3D"]),
}
MODELSCOPE = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024, attention_head_dim=64,
                  layers_per_block=2, norm_num_groups=32, in_channels=4, out_channels=4, sample_size=32)

_jit_cache: dict = {}


def call(model, x, t, ctx, **static):
    """``model(x, t, ctx, **static)`` under one jit per static keyword set (the weights are traced arguments)."""
    key = tuple(sorted(static.items()))
    if key not in _jit_cache:
        _jit_cache[key] = jax.jit(lambda m, x, t, c: m(x, t, c, **static))
    return np.asarray(_jit_cache[key](PureModel.of(model), x, t, ctx))


def torch_model(name: str, seed: int = 0):
    """A diffusers UNet3DConditionModel with every weight perturbed (so its zero-initialised temporal convs
    are not the identity and its norms not unit), rounded to float16 values."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from tests.models.fixtures.make_unet import perturb_

    torch.manual_seed(seed)
    return perturb_(diffusers.UNet3DConditionModel(**CONFIGS[name]), seed + 1)


def torch_io(model, frames: int, hw: tuple[int, int], seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    io = {"sample": torch.randn(2, 4, frames, *hw, generator=g), "timesteps": torch.tensor([3.5, 981.0]),
          "encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}
    with torch.no_grad():
        io["out"] = model(io["sample"], io["timesteps"], io["encoder_hidden_states"]).sample
    return {k: v.numpy() for k, v in io.items()}


def to_bfhwc(x: np.ndarray) -> np.ndarray:
    """diffusers' (B, C, F, H, W) -> jaxdiff's (B, F, H, W, C)."""
    return np.transpose(x, (0, 2, 3, 4, 1))


@pytest.mark.parity
@pytest.mark.parametrize("name,frames,hw", [("cross", 2, (8, 8)), ("plain", 5, (6, 10))])
def test_matches_diffusers_loaded_from_its_folder(tmp_path, name, frames, hw):
    """diffusers' ``save_pretrained`` folder loads through ``load_model_folder`` (the registry) and the output
    matches diffusers' <= 1e-4: two frame counts, stages with and without cross-attention to the text ("cross" has
    one of each kind, "plain" only DownBlock3D / UpBlock3D), a size that does not halve."""
    model = torch_model(name)
    io = torch_io(model, frames, hw)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model_folder(tmp_path)
    assert isinstance(ours, unet3d.UNet3DConditionModel)
    out = call(ours, to_bfhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"])
    assert_close(out, to_bfhwc(io["out"]))


@pytest.mark.parity
def test_jaxdiff_save_pretrained_loads_in_diffusers(tmp_path):
    """A jaxdiff model written by ``save_pretrained`` is a diffusers UNet3DConditionModel folder giving our output."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = unet3d.UNet3DConditionConfig.from_dict(CONFIGS["cross"])
    ours = perturbed(unet3d.UNet3DConditionModel(cfg, rngs=nnx.Rngs(3)), seed=4)
    save_pretrained(ours, tmp_path)
    theirs = diffusers.UNet3DConditionModel.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 2, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    t = np.array([500.0, 20.0], np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    assert_close(call(ours, to_bfhwc(x), t, ctx), to_bfhwc(ref))


@pytest.mark.parity
def test_attention_sites_are_diffusers_attention_processors():
    """Every attention layer, temporal ones included, is a Site named as diffusers' ``attn_processors`` keys."""
    model = torch_model("cross")
    cfg = unet3d.UNet3DConditionConfig.from_dict(CONFIGS["cross"])
    ours = abstract(lambda: unet3d.UNet3DConditionModel(cfg, rngs=nnx.Rngs(0)))
    expected = sorted(k.removesuffix(".processor") for k in model.attn_processors)
    assert sorted(s.path for s in ac.sites(ours)) == expected
    assert any(".temp_attentions." in p for p in expected) and any(p.startswith("transformer_in.") for p in expected)


def perturbed(model: nnx.Module, seed: int, amount: float = 0.05) -> nnx.Module:
    """``model`` with noise added to every parameter (zero-initialised layers become non-trivial)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda v: v + amount * rng.standard_normal(v.shape).astype(np.float32), state)
    return nnx.merge(graphdef, noisy)


def without_temporal_layers(model: nnx.Module) -> nnx.Module:
    """A copy whose temporal layers are exactly the identity: the last conv of every TemporalConvLayer and the
    ``proj_out`` of every TransformerTemporalModel set to zero (both are residual layers)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    for _, node in nnx.iter_graph(copy):
        if isinstance(node, TemporalConvLayer):
            last = node.conv4[3]
        elif isinstance(node, TransformerTemporalModel):
            last = node.proj_out
        else:
            continue
        last.kernel[...] = jnp.zeros(last.kernel.shape)
        last.bias[...] = jnp.zeros(last.bias.shape)
    return copy


def test_temporal_false_runs_each_frame_alone_through_the_spatial_layers():
    """``temporal=False`` (with per-frame timesteps) equals each frame run on its own, as a (B, H, W, C) batch
    with ``num_frames=1``, through the same network with its temporal layers removed; frames leaking into each
    other (through temporal layers, or norms taken over the video) would break the equality. The temporal
    layers do act: ``temporal=True`` differs."""
    cfg = unet3d.UNet3DConditionConfig.from_dict(CONFIGS["cross"])
    model = perturbed(unet3d.UNet3DConditionModel(cfg, rngs=nnx.Rngs(1)), seed=2)
    rng = np.random.default_rng(1)
    b, f = 2, 2
    x = rng.standard_normal((b, f, 8, 8, 4)).astype(np.float32)
    t = rng.uniform(0, 999, (b, f)).astype(np.float32)
    ctx = rng.standard_normal((b, 5, 16)).astype(np.float32)
    out = call(model, x, t, ctx, temporal=False)
    spatial = without_temporal_layers(model)
    for i in range(f):
        alone = call(spatial, x[:, i], t[:, i], ctx, num_frames=1)
        assert alone.shape == (b, 8, 8, 4)
        assert_close(out[:, i], alone, rel=1e-5)
    video = call(model, x, t[:, 0], ctx)
    assert np.abs(video - out).max() > 1e-2


def test_temporal_attention_is_an_attention_site():
    """Controls reach the temporal attention: a Set (uniform probabilities) then a Record at one temporal site
    give one (B*H*W, F, F) frame-to-frame map per pixel, all 1/F, and the edit changes the output."""
    cfg = unet3d.UNet3DConditionConfig.from_dict(CONFIGS["cross"])
    model = perturbed(unet3d.UNet3DConditionModel(cfg, rngs=nnx.Rngs(1)), seed=2)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    path = "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1"
    where = ac.Where(paths=(path,))
    control = ac.compose(ac.Set(where=where), ac.Record(where=where))
    edited, records = jax.jit(lambda m, c: m(x, t, ctx, control=c, return_records=True))(PureModel.of(model), control)
    assert set(records) == {path} and records[path].shape == (2 * 64, 2, 2)
    np.testing.assert_allclose(np.asarray(records[path]), 0.5, rtol=1e-6)
    assert np.abs(np.asarray(edited) - call(model, x, t, ctx)).max() > 1e-4


def test_modelscope_sized_shapes():
    """A ModelScope-sized config (320-1280 channels) on 16 frames of 32x32 latents, traced abstractly; with
    torch, its parameter count equals diffusers'."""
    cfg = unet3d.UNet3DConditionConfig.from_dict(MODELSCOPE)
    model = abstract(lambda: unet3d.UNet3DConditionModel(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, 16, 32, 32, 4), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 77, 1024), jnp.float32)
    out = jax.eval_shape(lambda m, x, c: m(x, 999, c), PureModel.of(model), x, ctx)
    assert out.shape == (1, 16, 32, 32, 4) and out.dtype == jnp.float32
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert count_params(model) == reference_param_count("UNet3DConditionModel", MODELSCOPE)


def test_unsupported_configs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="unsupported down block 'CrossAttnDownBlock2D'"):
        unet3d.UNet3DConditionConfig.from_dict(dict(CONFIGS["cross"], down_block_types=["CrossAttnDownBlock2D"] * 2))
    with pytest.raises(ValueError, match="num_attention_heads must be null"):
        unet3d.UNet3DConditionConfig.from_dict(dict(CONFIGS["cross"], num_attention_heads=4))
    with pytest.raises(ValueError, match="attention_head_dim 64 for a 32-channel block"):
        cfg = unet3d.UNet3DConditionConfig.from_dict(dict(CONFIGS["cross"], attention_head_dim=64))
        abstract(lambda: unet3d.UNet3DConditionModel(cfg, rngs=nnx.Rngs(0)))


def test_config_round_trips_through_config_json(tmp_path):
    cfg = unet3d.UNet3DConditionConfig.from_dict(CONFIGS["plain"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), default=list))
    again = unet3d.UNet3DConditionConfig.from_dict(json.loads(Path(tmp_path / "config.json").read_text()))
    assert again == cfg
