"""The GLIDE-style U-Nets of DeepFloyd IF and unCLIP (UNet2DConditionModel / UNet2DModel) against diffusers.

Tiny configs are diffusers' own fast-test components (tests/pipelines/deepfloyd_if/__init__.py,
tests/pipelines/unclip/test_unclip.py); every weight is perturbed (so zero-initialised layers count) and
the model is saved with ``save_pretrained`` and read back by jaxdiff's loader. Full-size parameter counts
are compared with diffusers' model built on torch's meta device.
"""
from __future__ import annotations

import json
from pathlib import Path
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models import attention_control as ac
from jaxdiff.models import controlnet, unet, unet2d
from jaxdiff.models._pure import PureModel
from tests.models._convnet_cases import apply, assert_close, load_config, nchw, nhwc, reference_param_count

IF_I = dict(  # _get_dummy_components
    sample_size=32, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu",
)
IF_II = dict(  # _get_superresolution_dummy_components
    IF_I, layers_per_block=[1, 2], in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
    time_embedding_act_fn="gelu", time_embedding_dim=32,
)
UNCLIP_DECODER = dict(  # UnCLIPPipelineFastTests.dummy_decoder
    sample_size=32, in_channels=3, out_channels=6,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=100, attention_head_dim=4,
    resnet_time_scale_shift="scale_shift", class_embed_type="identity",
)
UNCLIP_SUPER_RES = dict(  # dummy_super_res_kwargs, with karlo's scale-shift norm
    sample_size=8, layers_per_block=1, down_block_types=["ResnetDownsampleBlock2D"] * 2,
    up_block_types=["ResnetUpsampleBlock2D"] * 2, block_out_channels=[32, 64], in_channels=6, out_channels=3,
    resnet_time_scale_shift="scale_shift",
)
GLIDE_VARIANTS = dict(  # the other keys: LayerNorm on the text, only-cross attention, skipped time act, scaled resnets
    sample_size=8, layers_per_block=1, block_out_channels=[32, 32], in_channels=3, out_channels=3,
    down_block_types=["SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=[8, 16], cross_attention_norm="layer_norm",
    only_cross_attention=[True, False], mid_block_only_cross_attention=True, resnet_skip_time_act=True,
    resnet_out_scale_factor=1.5, time_embedding_act_fn="silu", norm_num_groups=8,
)


def _diffusers_case(cls_name: str, config: dict, seed: int):
    """(torch model, config dict as saved, weights as saved) of a perturbed tiny diffusers model."""
    import diffusers
    import torch

    from tests.models.fixtures.make_unet import perturb_

    torch.manual_seed(seed)
    model = perturb_(getattr(diffusers, cls_name)(**config), seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        saved = json.loads((Path(tmp) / "config.json").read_text())
        weights = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            weights.update(load_file(str(f)))
    return model, saved, weights


def _torch_out(model, *args, **kwargs) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(*args, **kwargs).sample.float().numpy()


def _inputs(seed: int, batch: int, channels: int, hw: tuple[int, int], text: tuple[int, int] | None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, *hw)).astype(np.float32)
    t = np.array([3.0, 917.0][:batch], np.float32)
    ctx = None if text is None else rng.standard_normal((batch, *text)).astype(np.float32)
    return rng, x, t, ctx


def _run(model, *args, **kwargs) -> np.ndarray:
    return nchw(apply(PureModel.of(model), *args, **kwargs))


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return torch


@pytest.mark.parity
@pytest.mark.parametrize("name,config,hw", [("if_stage_1", IF_I, (8, 8)), ("glide_variants", GLIDE_VARIANTS, (8, 12))])
def test_if_stage_1_matches_diffusers(torch_mods, name, config, hw):
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", config, 11)
    _, x, t, ctx = _inputs(1, 2, config["in_channels"], hw, (5, config.get("encoder_hid_dim") or 32))
    ref = _torch_out(model, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    ours = unet.from_pretrained_tensors(saved, weights)
    assert_close(_run(ours, nhwc(x), t, ctx), ref)


@pytest.mark.parity
def test_if_stage_2_with_noise_level_matches_diffusers(torch_mods):
    """Stage II: 6 input channels (noisy image and upscaled stage-I image), the augmentation noise level as
    ``class_labels`` (a second sinusoidal timestep), GELU on the summed embedding."""
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", IF_II, 12)
    _, x, t, ctx = _inputs(2, 2, 6, (8, 8), (5, 32))
    noise_level = np.array([250.0, 0.0], np.float32)
    ref = _torch_out(model, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                     class_labels=torch.from_numpy(noise_level))
    ours = unet.from_pretrained_tensors(saved, weights)
    assert_close(_run(ours, nhwc(x), t, ctx, class_labels=noise_level), ref)
    assert ours.config.time_embed_dim == 32 and ours.add_embedding.pool.num_heads == 2


@pytest.mark.parity
def test_unclip_decoder_with_image_embedding_and_text_mask_matches_diffusers(torch_mods):
    """unCLIP's decoder: the CLIP image embedding (projected by the text-proj model) added to the time
    embedding as an ``identity`` class embedding; the text mask enters the added-KV attention."""
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", UNCLIP_DECODER, 13)
    rng, x, t, ctx = _inputs(3, 2, 3, (8, 8), (7, 100))
    image_emb = rng.standard_normal((2, 128)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    ref = _torch_out(model, *args, class_labels=torch.from_numpy(image_emb), attention_mask=torch.from_numpy(mask))
    ours = unet.from_pretrained_tensors(saved, weights)
    out = _run(ours, nhwc(x), t, ctx, class_labels=image_emb, attention_mask=mask)
    assert_close(out, ref)
    unmasked = _torch_out(model, *args, class_labels=torch.from_numpy(image_emb))
    assert np.abs(unmasked - ref)[1].max() > 1e-3  # the mask matters (row 1), so the test can see it
    assert_close(_run(ours, nhwc(x), t, ctx, class_labels=image_emb), unmasked)


@pytest.mark.parity
def test_unclip_super_res_unet2d_matches_diffusers(torch_mods):
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DModel", UNCLIP_SUPER_RES, 14)
    _, x, t, _ = _inputs(4, 2, 6, (8, 8), None)
    ref = _torch_out(model, torch.from_numpy(x), torch.from_numpy(t))
    ours = unet2d.from_pretrained_tensors(saved, weights)
    assert_close(_run(ours, nhwc(x), t), ref)


@pytest.mark.parametrize("name,cls,expected", [
    ("if_i_xl_unet", "UNet2DConditionModel", 4_304_695_110),
    ("if_ii_l_unet", "UNet2DConditionModel", 1_316_476_166),
    ("karlo_decoder_unet", "UNet2DConditionModel", None),
    ("karlo_super_res_unet", "UNet2DModel", None),
])
def test_full_size_parameter_counts_match_diffusers(name, cls, expected):
    """Full-size configs built abstractly (``jax.eval_shape``): every parameter diffusers has, no more."""
    config = load_config(name)
    if cls == "UNet2DModel":
        cfg = unet2d.UNet2DConfig.from_dict(config)
        model = abstract(lambda: unet2d.UNet2DModel(cfg, rngs=nnx.Rngs(0)))
    else:
        cfg = unet.UNet2DConditionConfig.from_dict(config)
        model = abstract(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    ours = count_params(model)
    if expected is not None:
        assert ours == expected
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert reference_param_count(cls, config) == ours
