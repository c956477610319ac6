"""DiT against diffusers' DiTTransformer2DModel (committed fixtures, live rebuild, full-size count)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models._pure import PureModel
from jaxdiff.models.dit import DiTConfig, DiTTransformer2DModel, from_pretrained_tensors, sincos_2d, unpatchify

from tests.models._textdit_cases import CONFIGS, DATA, fx

CASES = ["dit_a", "dit_b"]
_forward = jax.jit(lambda model, x, t, y: model(x, t, y))


def _check(case: str, model: DiTTransformer2DModel, inputs: dict, expected: dict) -> None:
    got = _forward(PureModel.of(model), *(jnp.asarray(inputs[k]) for k in ("latents_nhwc", "timesteps", "class_labels")))
    fx.assert_close(got, expected["sample_nhwc"], f"{case}/sample")


@pytest.mark.parametrize("case", CASES)
def test_dit_fixture(case):
    config, tensors, inputs, outputs = fx.load_case(DATA / case)
    _check(case, from_pretrained_tensors(config, tensors), inputs, outputs)


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
def test_dit_live(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    model, inputs, outputs = fx.build(case)
    fx.save_pretrained(model, tmp_path)
    config, tensors, _, _ = fx.load_case(tmp_path)
    _check(case, DiTTransformer2DModel.from_pretrained_tensors(config, tensors), inputs, outputs)


def test_sincos_table_closed_form():
    """Token (row i, col j): first half encodes the column, second the row; sin then cos; frequencies 1, 1/100.
    Coordinates are rescaled to the base grid: a 5-wide grid with base 3 has columns at j * 3/5."""
    table = sincos_2d(8, 3, 5, base_size=3)
    i, j = 2, 4 * 3 / 5
    np.testing.assert_allclose(table[2 * 5 + 4], [np.sin(j), np.sin(j / 100), np.cos(j), np.cos(j / 100),
                                                  np.sin(i), np.sin(i / 100), np.cos(i), np.cos(i / 100)], rtol=1e-6)
    # at twice the training grid the coordinates are halved (diffusers' base_size rescaling)
    np.testing.assert_allclose(sincos_2d(8, 6, 6, base_size=3)[2 * 6 + 2], sincos_2d(8, 3, 3, base_size=3)[1 * 3 + 1])


def test_unpatchify_inverts_patch_order():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = 2
    tokens = x.reshape(2, 2, p, 3, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, p * p * 3)
    np.testing.assert_array_equal(unpatchify(tokens, 2, 3, p), x)


def test_scalar_timestep_broadcasts_and_bad_input_raises():
    config, tensors, inputs, _ = fx.load_case(DATA / "dit_a")
    model = from_pretrained_tensors(config, tensors)
    x, labels = jnp.asarray(inputs["latents_nhwc"]), jnp.asarray(inputs["class_labels"])
    pure = PureModel.of(model)
    np.testing.assert_allclose(_forward(pure, x, 17, labels), _forward(pure, x, jnp.array([17, 17, 17]), labels), atol=1e-6)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(pure, jnp.zeros((1, 4, 8, 8)), 1, 0)
    with pytest.raises(ValueError, match="norm_type"):
        DiTConfig(norm_type="ada_norm_single")


DIT_XL_2 = 749_826_464  # diffusers DiTTransformer2DModel(DiT-XL/2 config) on torch's meta device; the original
# DiT's 675,129,632 counts its fixed pos_embed (294,912) and shares one t/y embedder across the 28 blocks.


@pytest.mark.parametrize("name", ["dit_xl_2_256"])
def test_dit_xl_parameter_count(name):
    cfg = DiTConfig.from_dict(json.loads((CONFIGS / f"{name}.json").read_text()))
    assert count_params(abstract(lambda: DiTTransformer2DModel(cfg, rngs=nnx.Rngs(0)))) == DIT_XL_2
    assert 675_129_632 - 256 * 1152 + 27 * (256 * 1152 + 1152 + 1152 * 1152 + 1152 + 1001 * 1152) == DIT_XL_2


@pytest.mark.parity
def test_dit_xl_count_matches_meta():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.DiTTransformer2DModel.from_config(json.loads((CONFIGS / "dit_xl_2_256.json").read_text()))
    assert sum(p.numel() for p in ref.parameters()) == DIT_XL_2


def test_bfloat16_compute_stays_close():
    """bfloat16 weights and compute: same outputs to bfloat16 accuracy (a few % of the scale)."""
    config, tensors, inputs, outputs = fx.load_case(DATA / "dit_a")
    model = from_pretrained_tensors(config, tensors, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    args = (jnp.asarray(inputs[k]) for k in ("latents_nhwc", "timesteps", "class_labels"))
    got = _forward(PureModel.of(model), *args)
    assert got.dtype == jnp.bfloat16
    ref = outputs["sample_nhwc"]
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref))) < 0.05 * np.abs(ref).max()
