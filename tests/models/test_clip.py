"""CLIP text / vision towers against transformers (committed fixtures, live rebuild, full-size counts)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.torch_layout import CheckpointMismatchError, abstract, count_params
from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from tests.models._textdit_cases import CONFIGS, DATA, fx

TEXT_CLASSES = {"clip_text_quick_gelu": CLIPTextModel, "clip_text_gelu": CLIPTextModelWithProjection}


@jax.jit
def _text_outputs(model: PureModel, ids, mask):
    m = model.module()
    out = m(ids)
    return {
        "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output,
        "text_embeds": out.text_embeds,
        "embeddings": out.hidden_states[0],
        "penultimate": m.hidden_state(ids, index=-2, final_layer_norm=False),
        "penultimate_final_ln": m.hidden_state(ids, index=-2),
        "last_via_index": m.hidden_state(ids, index=-1),
        "penultimate_from_tuple": out.hidden_states[-2],
        "last_hidden_state_masked": m(ids, mask).last_hidden_state,
    }


def _check_text(case: str, model, inputs: dict, expected: dict) -> None:
    got = _text_outputs(PureModel.of(model), jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]))
    for name, ref in expected.items():
        fx.assert_close(got[name], ref, f"{case}/{name}")
    fx.assert_close(got["last_via_index"], expected["last_hidden_state"], f"{case}/index -1")
    fx.assert_close(got["penultimate_from_tuple"], expected["penultimate"], f"{case}/hidden_states[-2]")


@pytest.mark.parametrize("case", sorted(TEXT_CLASSES))
def test_clip_text_fixture(case):
    config, tensors, inputs, outputs = fx.load_case(DATA / case)
    model = TEXT_CLASSES[case].from_pretrained_tensors(config, tensors)
    _check_text(case, model, inputs, outputs)


@jax.jit
def _vision_outputs(model: PureModel, pixels):
    out = model(pixels)
    return {"image_embeds": out.image_embeds, "last_hidden_state": out.last_hidden_state, "penultimate": out.hidden_states[-2]}


def test_clip_vision_fixture():
    config, tensors, inputs, outputs = fx.load_case(DATA / "clip_vision")
    model = CLIPVisionModelWithProjection.from_pretrained_tensors(config, tensors)
    got = _vision_outputs(PureModel.of(model), jnp.asarray(inputs["pixel_values_nhwc"]))
    for name, ref in outputs.items():
        fx.assert_close(got[name], ref, f"clip_vision/{name}")


@pytest.mark.parity
@pytest.mark.parametrize("case", [*sorted(TEXT_CLASSES), "clip_vision"])
def test_clip_live(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model, inputs, outputs = fx.build(case)
    fx.save_pretrained(model, tmp_path)
    config, tensors, _, _ = fx.load_case(tmp_path)
    if case == "clip_vision":
        jmodel = CLIPVisionModelWithProjection.from_pretrained_tensors(config, tensors)
        got = _vision_outputs(PureModel.of(jmodel), jnp.asarray(inputs["pixel_values_nhwc"]))
        for name, ref in outputs.items():
            fx.assert_close(got[name], ref, f"{case}/{name}")
    else:
        _check_text(case, TEXT_CLASSES[case].from_pretrained_tensors(config, tensors), inputs, outputs)


def test_checkpoint_prefixes_and_clip_model_files():
    """transformers 5 (no ``text_model.`` prefix), transformers 4 (prefix) and full CLIPModel files all load."""
    config, tensors, _, _ = fx.load_case(DATA / "clip_text_quick_gelu")
    prefixed = {f"text_model.{k}": v for k, v in tensors.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(16)[None]
    prefixed["vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    prefixed["logit_scale"] = np.float32(2.0)
    a = CLIPTextModel.from_pretrained_tensors(config, tensors)
    b = CLIPTextModel.from_pretrained_tensors(config, prefixed)
    ta, tb = nnx.state(a), nnx.state(b)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), ta, tb))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        CLIPTextModel.from_pretrained_tensors(config, {k: v for k, v in tensors.items() if "layers.2" not in k})


def test_bad_inputs_raise_clear_errors():
    """Checked while tracing (shapes are static), so abstract modules suffice."""
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="swish2")
    cfg = CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=4)
    text = lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    with pytest.raises(ValueError, match="max_position_embeddings"):
        nnx.eval_shape(lambda: text()(jnp.zeros((1, 5), jnp.int32)))
    with pytest.raises(ValueError, match="out of range"):
        nnx.eval_shape(lambda: text().hidden_state(jnp.zeros((1, 4), jnp.int32), index=-3))
    vcfg = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                            patch_size=4)
    with pytest.raises(ValueError, match="8x8"):
        nnx.eval_shape(lambda: CLIPVisionModelWithProjection(vcfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 12, 12, 3))))


# Reference counts: transformers models built on torch's meta device (see test_full_size_counts_match_meta).
FULL_SIZE = {
    "clip_vit_l14_text": (CLIPTextModel, 123_060_480),  # SD 1.x text encoder (openai/clip-vit-large-patch14)
    "clip_vit_h14_text": (CLIPTextModel, 340_387_840),  # SD 2.x text encoder (OpenCLIP ViT-H/14, 23 layers)
    "clip_vit_h14_vision": (CLIPVisionModelWithProjection, 632_076_800),  # SD unCLIP / IP-Adapter image encoder
    "clip_vit_bigg14_text": (CLIPTextModelWithProjection, 694_659_840),  # SDXL text_encoder_2 (OpenCLIP bigG/14)
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
    cls, expected = FULL_SIZE[name]
    cfg = cls.config_class.from_dict(json.loads((CONFIGS / f"{name}.json").read_text()))
    assert count_params(abstract(lambda: cls(cfg, rngs=nnx.Rngs(0)))) == expected


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_counts_match_meta(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls, expected = FULL_SIZE[name]
    d = json.loads((CONFIGS / f"{name}.json").read_text())
    config_cls = transformers.CLIPVisionConfig if cls is CLIPVisionModelWithProjection else transformers.CLIPTextConfig
    with torch.device("meta"):
        ref = getattr(transformers, cls.__name__)(config_cls(**_known(d)))
    assert sum(p.numel() for p in ref.parameters()) == expected


def _known(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def test_bfloat16_compute_stays_close():
    """bfloat16 weights and compute: same outputs to bfloat16 accuracy (a few % of the scale)."""
    config, tensors, inputs, outputs = fx.load_case(DATA / "clip_text_gelu")
    model = CLIPTextModelWithProjection.from_pretrained_tensors(config, tensors, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    got = jax.jit(lambda m, ids: m(ids).last_hidden_state)(PureModel.of(model), jnp.asarray(inputs["input_ids"]))
    assert got.dtype == jnp.bfloat16
    ref = outputs["last_hidden_state"]
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref))) < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("backend", ["blockwise", "xla"])
def test_clip_attention_runs_through_the_one_attention_function(backend):
    """The causal and padding masks reach every backend of ``attention()``: the text tower follows the
    default backend (blockwise: a scan over key blocks) and still equals transformers."""
    from jaxdiff.models.attention import default_backend

    config, tensors, inputs, outputs = fx.load_case(DATA / "clip_text_quick_gelu")
    model = PureModel.of(CLIPTextModel.from_pretrained_tensors(config, tensors))
    ids, mask = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"])
    fn = lambda m: (m(ids).last_hidden_state, m(ids, mask).last_hidden_state)  # noqa: E731
    with default_backend(backend):
        jaxpr = str(jax.make_jaxpr(fn)(model))
        last, masked = jax.jit(fn)(model)
    assert ("scan" in jaxpr) == (backend == "blockwise")
    fx.assert_close(last, outputs["last_hidden_state"], f"clip {backend}")
    fx.assert_close(masked, outputs["last_hidden_state_masked"], f"clip {backend} masked")
