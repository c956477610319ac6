"""UNet2DConditionModel (Stable Diffusion 1.x / 2.x) against diffusers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert import CheckpointMismatchError
from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models import unet
from jaxdiff.models._pure import PureModel
from tests.models._convnet_cases import (
    apply, assert_close, live_case, load_case, load_config, nchw, nhwc, reference_param_count,
)

CASES = ["unet_sd1", "unet_sd2_depth", "unet_inpaint"]


def run(config: dict, weights: dict, io: dict, dtype=jnp.float32) -> np.ndarray:
    model = unet.from_pretrained_tensors(config, weights, dtype=dtype)
    kwargs = {"class_labels": io["class_labels"]} if "class_labels" in io else {}
    out = apply(PureModel.of(model), nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"], **kwargs)
    return nchw(out)


@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_fixture(case):
    config, weights, io = load_case(case)
    assert_close(run(config, weights, io), io["out"])


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_live(case):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, io = live_case(case)
    assert_close(run(config, weights, io), io["out"])
    assert_close(io["out"], load_case(case)[2]["out"], rel=1e-6)  # the committed fixture is current


@pytest.mark.parity
@pytest.mark.parametrize("case", ["unet_odd_heads", "unet_odd_heads_linear"])
def test_heads_that_do_not_divide_channels_match_diffusers_live(case):
    """diffusers builds ``Transformer2DModel(heads, channels // heads)``: 3 heads on 32 channels run
    the transformer 30 wide (conv or linear ``proj_in``), 5 heads on 64 run it 60 wide."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, io = live_case(case)
    assert weights["down_blocks.0.attentions.0.proj_in.weight"].shape[0] == 30
    assert_close(run(config, weights, io), io["out"])


def test_more_heads_than_channels_is_rejected():
    config = {**load_case("unet_inpaint")[0], "attention_head_dim": 9}  # 9 heads on 8 channels
    with pytest.raises(ValueError, match="9 attention heads for a 8-channel block"):
        unet.from_pretrained_tensors(config, load_case("unet_inpaint")[1])


def test_bfloat16_compute_is_close_to_float32():
    config, weights, io = load_case("unet_sd1")
    out = run(config, weights, io, dtype=jnp.bfloat16)
    assert out.dtype == np.dtype(jnp.bfloat16)
    err = np.abs(out.astype(np.float32) - io["out"]).max()
    assert err < 0.05 * np.abs(io["out"]).max(), err


@pytest.mark.parametrize("name,expected", [("sd15_unet", 859_520_964), ("sd21_unet", 865_910_724)])
def test_full_size_parameter_count(name, expected):
    config = load_config(name)
    cfg = unet.UNet2DConditionConfig.from_dict(config)
    model = abstract(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == expected
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert reference_param_count("UNet2DConditionModel", config) == expected


def test_sd21_config_reads_per_block_heads():
    cfg = unet.UNet2DConditionConfig.from_dict(load_config("sd21_unet"))
    assert cfg.heads() == (5, 10, 20, 20) and cfg.use_linear_projection and cfg.upcast_attention
    assert unet.UNet2DConditionConfig.from_dict(load_config("sd15_unet")).heads() == (8, 8, 8, 8)


@pytest.mark.parametrize("bad,match", [
    ({"down_block_types": ["KCrossAttnDownBlock2D", "DownBlock2D"]}, "unsupported down block"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"class_embed_type": "simple_projection"}, "class_embed_type"),
])
def test_unsupported_config_is_rejected(bad, match):
    config = {**load_case("unet_inpaint")[0], **bad}
    with pytest.raises(ValueError, match=match):
        unet.UNet2DConditionConfig.from_dict(config)


def test_checkpoint_of_another_config_is_rejected():
    config, _, _ = load_case("unet_sd1")
    _, other_weights, _ = load_case("unet_inpaint")
    with pytest.raises(CheckpointMismatchError):
        unet.from_pretrained_tensors(config, other_weights)


def test_bad_inputs_raise_clear_errors():
    config, weights, io = load_case("unet_inpaint")
    model = unet.from_pretrained_tensors(config, weights)
    x, t, text = nhwc(io["sample"]), io["timesteps"], io["encoder_hidden_states"]
    with pytest.raises(ValueError, match="9 channels"):
        jax.eval_shape(lambda: model(x[..., :4], t, text, class_labels=io["class_labels"]))
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(lambda: model(x, t, text))
