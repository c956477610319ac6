"""AutoencoderKL (Stable Diffusion's VAE) against diffusers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models import vae
from jaxdiff.models._pure import PureModel
from tests.models._convnet_cases import (
    apply, assert_close, live_case, load_case, load_config, nchw, nhwc, reference_param_count,
)


def run(config: dict, weights: dict, io: dict) -> dict[str, np.ndarray]:
    model = PureModel.of(vae.from_pretrained_tensors(config, weights))
    mean, logvar = apply(model.bind("encode"), nhwc(io["image"]))
    decoded = apply(model.bind("decode"), nhwc(io["latent"]))
    return {"mean": nchw(mean), "logvar": nchw(logvar), "decoded": nchw(decoded)}


def test_encode_decode_match_diffusers_fixture():
    config, weights, io = load_case("vae_tiny")
    out = run(config, weights, io)
    for key in ("mean", "logvar", "decoded"):
        assert_close(out[key], io[key])


@pytest.mark.parity
def test_encode_decode_match_diffusers_live():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, io = live_case("vae_tiny")
    out = run(config, weights, io)
    for key in ("mean", "logvar", "decoded"):
        assert_close(out[key], io[key])
        assert_close(io[key], load_case("vae_tiny")[2][key], rel=1e-6)


def test_old_attention_names_load_identically():
    """Checkpoints from before diffusers 0.14 call the mid-block attention query/key/value/proj_attn."""
    config, weights, _ = load_case("vae_tiny")
    old = {}
    for k, v in weights.items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions." in k and f".{new_name}." in k:
                k = k.replace(f".{new_name}.", f".{old_name}.")
        old[k] = v
    assert old.keys() != weights.keys()
    a = nnx.state(vae.from_pretrained_tensors(config, weights))
    b = nnx.state(vae.from_pretrained_tensors(config, old))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_scaling_factor_comes_from_config():
    # That encode/decode do not apply it is shown by the parity tests (diffusers does not either).
    config, weights, _ = load_case("vae_tiny")
    model = vae.from_pretrained_tensors(config, weights)
    assert model.scaling_factor == config["scaling_factor"] == 0.18215


def test_wrong_image_size_raises():
    config, weights, _ = load_case("vae_tiny")
    model = vae.from_pretrained_tensors(config, weights)
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(lambda: model.encode(jnp.zeros((1, 15, 16, 3))))
    with pytest.raises(ValueError, match="3 channels"):
        jax.eval_shape(lambda: model.encode(jnp.zeros((1, 16, 16, 4))))


def test_sd_vae_parameter_count():
    config = load_config("sd_vae")
    cfg = vae.AutoencoderKLConfig.from_dict(config)
    model = abstract(lambda: vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == 83_653_863
    assert cfg.downscale == 8
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert reference_param_count("AutoencoderKL", config) == 83_653_863
