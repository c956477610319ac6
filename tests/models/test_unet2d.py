"""UNet2DModel (pixel-space DDPM / ADM U-Net) against diffusers."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models import unet2d
from jaxdiff.models._pure import PureModel
from tests.models._convnet_cases import apply, assert_close, live_case, load_case, nchw, nhwc

CASES = ["unet2d_digits", "unet2d_adm"]


def run(config: dict, weights: dict, io: dict, **overrides) -> np.ndarray:
    model = unet2d.from_pretrained_tensors(config, weights)
    args = {"timesteps": io["timesteps"], "class_labels": io.get("class_labels"), **overrides}
    return nchw(apply(PureModel.of(model), nhwc(io["sample"]), args["timesteps"], args["class_labels"]))


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
    assert_close(io["out"], load_case(case)[2]["out"], rel=1e-6)


@pytest.mark.parity
def test_head_dim_that_does_not_divide_channels_matches_diffusers_live():
    """Head size 5 on 32 / 64 channels: diffusers uses 6 / 12 heads, attention 30 / 60 wide."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, io = live_case("unet2d_odd_head_dim")
    assert weights["mid_block.attentions.0.to_q.weight"].shape == (60, 64)
    assert_close(run(config, weights, io), io["out"])


def test_class_labels_change_the_output_and_are_required():
    config, weights, io = load_case("unet2d_digits")
    other = run(config, weights, io, class_labels=io["class_labels"][::-1].copy())
    assert np.abs(other - io["out"]).max() > 1e-3
    model = unet2d.from_pretrained_tensors(config, weights)
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(lambda: model(nhwc(io["sample"]), io["timesteps"]))


def test_scalar_timestep_broadcasts_over_the_batch():
    config, weights, io = load_case("unet2d_adm")
    both = run(config, weights, {**io, "timesteps": np.full(2, io["timesteps"][1], np.float32)})
    scalar = run(config, weights, {**io, "timesteps": np.float32(io["timesteps"][1])})
    np.testing.assert_allclose(scalar, both, atol=1e-6)
    assert_close(both[1], io["out"][1])  # sample 1 had this timestep in the fixture


def test_digits_sized_model_builds_and_compiles_fast():
    """The shape of the built-in digits model: 8x8, 1 channel, (32, 64) channels, 10 classes."""
    cfg = unet2d.UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                              attention_head_dim=32, norm_num_groups=8, num_class_embeds=10)
    model = unet2d.UNet2DModel(cfg, rngs=nnx.Rngs(0))
    start = time.perf_counter()
    out = jax.jit(lambda m, x, t, y: m(x, t, y))(PureModel.of(model), jnp.ones((4, 8, 8, 1)),
                                                 jnp.arange(4.0), jnp.arange(4))
    assert out.shape == (4, 8, 8, 1) and bool(jnp.isfinite(out).all())
    assert time.perf_counter() - start < 60


def test_bad_config_and_inputs_raise():
    config, weights, io = load_case("unet2d_adm")
    with pytest.raises(ValueError, match="unsupported down block"):
        unet2d.UNet2DConfig.from_dict({**config, "down_block_types": ["SkipDownBlock2D", "AttnDownBlock2D"]})
    model = unet2d.from_pretrained_tensors(config, weights)
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(lambda: model(jnp.ones((1, 7, 8, 3)), 1.0))
    with pytest.raises(ValueError, match="no class embedding"):
        jax.eval_shape(lambda: model(jnp.ones((1, 8, 8, 3)), 1.0, jnp.zeros((1,), jnp.int32)))
