"""T5 encoder against transformers (committed fixtures, live rebuild, buckets, full-size count)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.torch_layout import abstract, count_params
from jaxdiff.models._pure import PureModel
from jaxdiff.models.t5 import T5Config, T5EncoderModel, from_pretrained_tensors, relative_position_bucket

from tests.models._textdit_cases import CONFIGS, DATA, fx

CASES = ["t5_gated_gelu", "t5_relu"]


@jax.jit
def _outputs(model: PureModel, ids, mask):
    return {"last_hidden_state": model(ids, mask), "last_hidden_state_unmasked": model(ids)}


def _check(case: str, model: T5EncoderModel, inputs: dict, expected: dict) -> None:
    got = _outputs(PureModel.of(model), jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]))
    for name, ref in expected.items():
        fx.assert_close(got[name], ref, f"{case}/{name}")


@pytest.mark.parametrize("case", CASES)
def test_t5_fixture(case):
    config, tensors, inputs, outputs = fx.load_case(DATA / case)
    assert T5Config.from_dict(config).is_gated == (case == "t5_gated_gelu")
    _check(case, from_pretrained_tensors(config, tensors), inputs, outputs)


def test_t5_tied_embedding_layouts():
    """Files with both tied copies, or only ``encoder.embed_tokens``, load to the same model."""
    config, tensors, _, _ = fx.load_case(DATA / "t5_relu")
    both = {**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"]}
    only_encoder = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
    ref = nnx.state(from_pretrained_tensors(config, tensors))
    for variant in (both, only_encoder):
        got = nnx.state(T5EncoderModel.from_pretrained_tensors(config, variant))
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), ref, got))


def test_relative_position_bucket_closed_form():
    """Bidirectional buckets, 32 buckets / max distance 128 (T5): 0 -> 0, +1 -> 17, -1 -> 1, exact below 8,
    log-spaced up to 128, and saturating at 15 / 31."""
    rel = np.array([0, 1, -1, 7, -7, 8, 127, -127, 128, 500, -500])
    np.testing.assert_array_equal(relative_position_bucket(rel, 32, 128), [0, 17, 1, 23, 7, 24, 31, 15, 31, 31, 15])
    full = relative_position_bucket(np.arange(-300, 301), 32, 128)
    assert full.min() == 0 and full.max() == 31
    assert np.all(np.diff(full[301:]) >= 0) and np.all(np.diff(full[:300]) <= 0)  # monotone in |distance| per sign


@pytest.mark.parity
def test_relative_position_bucket_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-1000, 1001)
    for buckets, dist in [(32, 128), (8, 16), (64, 256), (32, 100)]:
        ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, dist).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, buckets, dist), ref)


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
def test_t5_live(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model, inputs, outputs = fx.build(case)
    fx.save_pretrained(model, tmp_path)
    config, tensors, _, _ = fx.load_case(tmp_path)
    _check(case, from_pretrained_tensors(config, tensors), inputs, outputs)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-gelu-fast")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swish")


XXL_ENCODER = 4_762_310_656  # transformers T5EncoderModel(google/t5-v1_1-xxl config) on torch's meta device


def test_t5_xxl_encoder_parameter_count():
    cfg = T5Config.from_dict(json.loads((CONFIGS / "t5_v1_1_xxl_encoder.json").read_text()))
    assert count_params(abstract(lambda: T5EncoderModel(cfg, rngs=nnx.Rngs(0)))) == XXL_ENCODER


@pytest.mark.parity
def test_t5_xxl_encoder_count_matches_meta():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = json.loads((CONFIGS / "t5_v1_1_xxl_encoder.json").read_text())
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**d))
    assert sum(p.numel() for p in ref.parameters()) == XXL_ENCODER


def test_bfloat16_compute_stays_close():
    """bfloat16 weights and compute: same outputs to bfloat16 accuracy (a few % of the scale)."""
    config, tensors, inputs, outputs = fx.load_case(DATA / "t5_gated_gelu")
    model = from_pretrained_tensors(config, tensors, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids, mask = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"])
    got = jax.jit(lambda m, i, k: m(i, k))(PureModel.of(model), ids, mask)
    assert got.dtype == jnp.bfloat16
    ref = outputs["last_hidden_state"]
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref))) < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("backend", ["blockwise", "xla"])
def test_t5_attention_runs_through_the_one_attention_function(backend):
    """The relative-position bias and the padding mask reach every backend of ``attention()``: the model
    follows the default backend (blockwise: a scan over key blocks) and still equals transformers."""
    from jaxdiff.models.attention import default_backend

    config, tensors, inputs, outputs = fx.load_case(DATA / "t5_gated_gelu")
    model = PureModel.of(from_pretrained_tensors(config, tensors))
    ids, mask = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"])
    with default_backend(backend):
        jaxpr = str(jax.make_jaxpr(lambda m: m(ids, mask))(model))
        got = jax.jit(lambda m: m(ids, mask))(model)
    assert ("scan" in jaxpr) == (backend == "blockwise")
    fx.assert_close(got, outputs["last_hidden_state"], f"t5 {backend}")
