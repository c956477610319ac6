"""ControlNetModel against diffusers, and its residuals fed into the U-Net end to end."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.conditioning import Residuals
from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models import controlnet, unet
from jaxdiff.models._pure import PureModel
from tests.models._convnet_cases import (
    apply, assert_close, live_case, load_case, load_config, nchw, nhwc, reference_param_count,
)


def run_controlnet(config, weights, io, scale=None):
    model = PureModel.of(controlnet.from_pretrained_tensors(config, weights))
    scale = io["conditioning_scale"] if scale is None else scale
    return apply(model, nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"],
                 nhwc(io["controlnet_cond"]), scale)


def check_case(config, weights, io, unet_config, unet_weights):
    res = run_controlnet(config, weights, io)
    assert isinstance(res, Residuals) and res.intra is None
    assert len(res.down) == len([k for k in io if k.startswith("down_")])
    for i, d in enumerate(res.down):
        assert_close(nchw(d), io[f"down_{i}"])
    assert_close(nchw(res.mid), io["mid"])
    model = PureModel.of(unet.from_pretrained_tensors(unet_config, unet_weights))
    out = apply(model, nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"], residuals=res)
    assert_close(nchw(out), io["unet_out"])
    named = apply(model, nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"],
                  down_block_additional_residuals=res.down, mid_block_additional_residual=res.mid)
    assert_close(nchw(named), io["unet_out"])


def test_residuals_and_controlled_unet_match_diffusers_fixture():
    config, weights, io = load_case("controlnet_sd1")
    unet_config, unet_weights, _ = load_case("unet_sd1")
    check_case(config, weights, io, unet_config, unet_weights)


@pytest.mark.parity
def test_residuals_and_controlled_unet_match_diffusers_live():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, io = live_case("controlnet_sd1")
    unet_config, unet_weights, _ = live_case("unet_sd1")
    check_case(config, weights, io, unet_config, unet_weights)
    assert_close(io["unet_out"], load_case("controlnet_sd1")[2]["unet_out"], rel=1e-6)


@pytest.mark.parity
def test_heads_that_do_not_divide_channels_match_diffusers_live():
    """3 heads on 32 and 64 channels (attention 30 and 63 wide), residuals and the controlled U-Net."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, io = live_case("controlnet_odd_heads")
    unet_config, unet_weights, _ = live_case("unet_odd_heads_linear")
    assert weights["mid_block.attentions.0.proj_in.weight"].shape == (63, 64)
    check_case(config, weights, io, unet_config, unet_weights)


def test_conditioning_scale_is_linear_and_traced():
    config, weights, io = load_case("controlnet_sd1")
    (d1, m1), (d2, m2) = ((r.down, r.mid) for r in (run_controlnet(config, weights, io, scale=np.float32(s))
                                                     for s in (0.5, 1.0)))
    np.testing.assert_allclose(np.asarray(m2), 2 * np.asarray(m1), rtol=1e-5, atol=1e-7)
    for a, b in zip(d1, d2):
        np.testing.assert_allclose(np.asarray(b), 2 * np.asarray(a), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(m2).max()) > 1e-3


def test_wrong_conditioning_image_size_raises():
    config, weights, io = load_case("controlnet_sd1")
    model = controlnet.from_pretrained_tensors(config, weights)
    with pytest.raises(ValueError, match="controlnet_cond must be NHWC of size"):
        jax.eval_shape(lambda: model(nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"],
                                     nhwc(io["sample"])[..., :3]))


def test_sd15_controlnet_parameter_count():
    config = load_config("sd15_controlnet")
    cfg = controlnet.ControlNetConfig.from_dict(config)
    model = abstract(lambda: controlnet.ControlNetModel(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == 361_279_120
    assert cfg.cond_downscale == 8
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert reference_param_count("ControlNetModel", config) == 361_279_120


def test_from_unet_copies_the_encoder_and_starts_with_zero_residuals():
    config, weights, io = load_case("unet_sd1")
    base = unet.from_pretrained_tensors(config, weights)
    cn = controlnet.controlnet_from_unet(base, rngs=nnx.Rngs(0), conditioning_embedding_out_channels=(4, 8))
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(getattr(cn, name)), nnx.state(getattr(base, name)))
    cond = np.ones((2, 16, 16, 3), np.float32)
    down = jax.eval_shape(lambda: cn(nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"], cond)).down
    assert [d.shape[1:3] for d in down] == [(8, 8), (8, 8), (4, 4), (4, 4), (2, 2), (2, 2)]
    for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
        assert not np.any(conv.kernel[...]) and not np.any(conv.bias[...])
