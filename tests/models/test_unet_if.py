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

from jaxdiff.conditioning import Residuals
from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models import attention_control as ac
from jaxdiff.models import controlnet, unet, unet2d
from jaxdiff.models import patches as P
from jaxdiff.models._pure import PureModel
from jaxdiff.models.layers import AddedKVAttention, Maker
from tests.models._convnet_cases import assert_close, load_config, nchw, nhwc, reference_param_count

IF_I = dict(  # _get_dummy_components
    sample_size=32, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3, out_channels=6,
    cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
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
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[32, 64], layers_per_block=1,
    cross_attention_dim=100, attention_head_dim=4,
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
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"], cross_attention_dim=32,
    attention_head_dim=[8, 16], cross_attention_norm="layer_norm",
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


def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


# XLA's backend optimisations off: the programs compile ~40% faster and agree with the optimised ones to float32
# rounding (these tests compare against diffusers at 1e-4). The model is a traced argument, so another state of the
# same architecture (a merged LoRA) reuses the program.
_JIT = jax.jit(_call, compiler_options={"xla_backend_optimization_level": 0})
_JIT_RECORDS = jax.jit(lambda model, *args, **kwargs: model(*args, return_records=True, **kwargs),
                       compiler_options={"xla_backend_optimization_level": 0})


def _run(model, *args, **kwargs) -> np.ndarray:
    model = model if isinstance(model, PureModel) else PureModel.of(model)
    return nchw(_JIT(model, *args, **kwargs))


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return torch


@pytest.mark.parity
def test_if_stage_1_and_a_lora_on_its_added_kv_projections_match_diffusers(torch_mods):
    """IF stage I; then a peft-named LoRA on the text key projection ``add_k_proj`` (and ``to_q``), merged by
    :func:`jaxdiff.models.patches.lora`, against diffusers with the same low-rank delta added to its weights."""
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", IF_I, 11)
    _, x, t, ctx = _inputs(1, 2, 3, (8, 8), (5, 32))
    args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    ours = unet.from_pretrained_tensors(saved, weights)
    base = _torch_out(model, *args)
    assert_close(_run(ours, nhwc(x), t, ctx), base)

    rng = np.random.default_rng(5)
    tensors = {}
    for target in ("down_blocks.1.attentions.0.add_k_proj", "mid_block.attentions.0.to_q"):
        w = weights[target + ".weight"]
        tensors[target + ".lora_A.weight"] = (0.3 * rng.standard_normal((2, w.shape[1]))).astype(np.float32)
        tensors[target + ".lora_B.weight"] = (0.3 * rng.standard_normal((w.shape[0], 2))).astype(np.float32)
        with torch.no_grad():
            model.get_submodule(target).weight += torch.from_numpy(
                tensors[target + ".lora_B.weight"] @ tensors[target + ".lora_A.weight"])
    patched = P.merge(PureModel.of(ours), P.lora(tensors, ours))
    ref = _torch_out(model, *args)
    assert_close(_run(patched, nhwc(x), t, ctx), ref)
    assert np.abs(ref - base).max() > 1e-3


@pytest.mark.parity
def test_glide_variant_keys_match_diffusers(torch_mods):
    """LayerNorm on the text, only-cross attention (one block and the mid block), the time activation skipped in
    the resnets, scaled resnet outputs, a time-embedding activation, per-block head widths, odd width."""
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", GLIDE_VARIANTS, 15)
    _, x, t, ctx = _inputs(5, 2, 3, (8, 12), (5, 32))
    ref = _torch_out(model, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    ours = unet.from_pretrained_tensors(saved, weights)
    assert ours.down_blocks[0].attentions[0].to_k is None and ours.mid_block.attentions[0].to_k is None
    assert_close(_run(ours, nhwc(x), t, ctx), ref)


@pytest.mark.parity
def test_if_stage_2_with_noise_level_and_residuals_matches_diffusers(torch_mods):
    """Stage II: 6 input channels (noisy image and upscaled stage-I image), the augmentation noise level as
    ``class_labels`` (a second sinusoidal timestep), GELU on the summed embedding; ControlNet-style residuals
    (:class:`jaxdiff.conditioning.Residuals`) on every skip and the mid output, as diffusers adds them."""
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", IF_II, 12)
    rng, x, t, ctx = _inputs(2, 2, 6, (8, 8), (5, 32))
    noise_level = np.array([250.0, 0.0], np.float32)
    shapes = [(2, 32, 8, 8)] * 2 + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * 2  # conv_in, resnet, downsampler, 2 resnets
    down = [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    mid = (0.5 * rng.standard_normal((2, 64, 4, 4))).astype(np.float32)
    ref = _torch_out(model, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                     class_labels=torch.from_numpy(noise_level),
                     down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                     mid_block_additional_residual=torch.from_numpy(mid))
    ours = unet.from_pretrained_tensors(saved, weights)
    residuals = Residuals(down=tuple(nhwc(d) for d in down), mid=nhwc(mid))
    assert_close(_run(ours, nhwc(x), t, ctx, class_labels=noise_level, residuals=residuals), ref)
    assert ours.config.time_embed_dim == 32 and ours.add_embedding.pool.num_heads == 2


@pytest.mark.parity
def test_unclip_decoder_with_image_embedding_text_mask_and_records_matches_diffusers(torch_mods):
    """unCLIP's decoder: the CLIP image embedding (projected by the text-proj model) added to the time
    embedding as an ``identity`` class embedding; the text mask enters the added-KV attention (the kernel
    path everywhere, and the explicit path of an attention control recording the mid block's maps)."""
    torch = torch_mods
    model, saved, weights = _diffusers_case("UNet2DConditionModel", UNCLIP_DECODER, 13)
    rng, x, t, ctx = _inputs(3, 2, 3, (8, 8), (7, 100))
    image_emb = rng.standard_normal((2, 128)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    ref = _torch_out(model, *args, class_labels=torch.from_numpy(image_emb), attention_mask=torch.from_numpy(mask))
    unmasked = _torch_out(model, *args, class_labels=torch.from_numpy(image_emb))
    assert np.abs(unmasked - ref)[1].max() > 1e-3  # the mask matters (row 1), so the test can see it
    ours = unet.from_pretrained_tensors(saved, weights)
    site = "mid_block.attentions.0"
    assert site in [s.path for s in ac.sites(ours)]
    record = ac.Record(where=ac.Where(paths=(site,)))
    out, records = _JIT_RECORDS(PureModel.of(ours), nhwc(x), t, ctx, class_labels=image_emb, attention_mask=mask,
                                control=record)
    assert_close(nchw(out), ref)
    maps = np.asarray(records[site])
    assert maps.shape == (2, 16, 7 + 16)  # 4x4 pixels attend to 7 text tokens, then to themselves
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert maps[1, :, 4:7].max() < 1e-6 and maps[0, :, 4:7].min() > 0


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
    ("if_ii_l_unet", "UNet2DConditionModel", 935_218_438),
    ("karlo_decoder_unet", "UNet2DConditionModel", 885_439_686),
    ("karlo_super_res_unet", "UNet2DModel", 691_579_523),
])
def test_full_size_parameter_counts_match_diffusers(name, cls, expected):
    """Full-size configs built abstractly (``jax.eval_shape``): every parameter diffusers has, no more. (The IF
    configs are reconstructed from diffusers' conversion script, see their ``_source``; karlo's are the script's.)"""
    config = load_config(name)
    if cls == "UNet2DModel":
        cfg = unet2d.UNet2DConfig.from_dict(config)
        model = abstract(lambda: unet2d.UNet2DModel(cfg, rngs=nnx.Rngs(0)))
    else:
        cfg = unet.UNet2DConditionConfig.from_dict(config)
        model = abstract(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    ours = count_params(model)
    assert ours == expected  # diffusers' count on the meta device (checked below when torch is installed)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert reference_param_count(cls, config) == ours


@pytest.mark.parametrize("bad,match", [
    ({"encoder_hid_dim_type": "image_proj"}, "encoder_hid_dim_type='image_proj' is not supported"),
    ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image' is not supported"),
    ({"cross_attention_norm": "batch_norm"}, "unsupported cross_attention_norm"),
    ({"time_embedding_act_fn": "tanh"}, "unsupported activation 'tanh'"),
    ({"encoder_hid_dim": None, "encoder_hid_dim_type": "text_proj"}, "needs encoder_hid_dim"),
    ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
])
def test_unsupported_settings_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        unet.UNet2DConditionConfig.from_dict({**IF_I, **bad})


def test_heads_wider_than_the_block_are_rejected():
    with pytest.raises(ValueError, match="attention_head_dim 128 for a 64-channel SimpleCrossAttn block"):
        cfg = unet.UNet2DConditionConfig.from_dict({**IF_I, "attention_head_dim": 128})
        abstract(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))


def test_controlnet_refuses_the_if_unet_features():
    """ControlNet copies the U-Net's encoder but is built for Stable Diffusion's blocks only."""
    with pytest.raises(ValueError, match="ControlNet supports the Stable Diffusion blocks only"):
        controlnet.ControlNetConfig.from_dict(IF_I)
    sd_blocks = dict(IF_I, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     mid_block_type="UNetMidBlock2DCrossAttn")
    with pytest.raises(ValueError, match="ControlNet does not support addition_embed_type='text'"):
        controlnet.ControlNetConfig.from_dict(sd_blocks)


def test_text_masks_and_odd_sizes_are_refused_where_they_cannot_apply():
    """The Stable Diffusion blocks take no text mask; a mask must match the text's batch and length; the resnet
    upsamplers need sizes that halve evenly."""
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,))
    sd_blocks = dict(IF_I, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn")
    cfg = unet.UNet2DConditionConfig.from_dict(sd_blocks)
    with pytest.raises(ValueError, match="CrossAttn blocks take no mask"):  # built and called abstractly
        jax.eval_shape(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))(
            x, t, jnp.zeros((2, 5, 32)), attention_mask=jnp.ones((2, 5))))
    if_cfg = unet.UNet2DConditionConfig.from_dict(IF_I)
    with pytest.raises(ValueError, match=r"must be multiples of 2, got \(7, 8\)"):
        jax.eval_shape(lambda: unet.UNet2DConditionModel(if_cfg, rngs=nnx.Rngs(0))(
            x[:, :7], t, jnp.zeros((2, 5, 32))))
    def attend() -> jax.Array:  # 5 text tokens, a bias for 6
        layer = AddedKVAttention(32, Maker(nnx.Rngs(0)), heads=4, dim_head=8, added_kv_dim=12, groups=8)
        return layer(jnp.zeros((2, 4, 4, 32)), jnp.zeros((2, 5, 12)), text_bias=jnp.zeros((2, 6)))

    with pytest.raises(ValueError, match="does not match the text"):
        jax.eval_shape(attend)


def test_edits_sized_for_the_text_alone_raise_a_clear_error():
    """An added-KV layer's keys are the text tokens then the pixels: a per-token re-weighting sized for the text
    alone cannot apply, and says why."""
    def attend() -> jax.Array:
        layer = AddedKVAttention(32, Maker(nnx.Rngs(0)), heads=4, dim_head=8, added_kv_dim=12, groups=8)
        run = ac.ControlRun(ac.Reweight(jnp.ones((5,))))
        return layer(jnp.zeros((2, 4, 4, 32)), jnp.zeros((2, 5, 12)), control=run)

    with pytest.raises(ValueError, match=r"5 text tokens followed by the 16 pixels, so the maps are \(B, heads, 16"):
        jax.eval_shape(attend)
