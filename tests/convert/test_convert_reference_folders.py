"""Folders and files written by diffusers / transformers themselves, and end-to-end loads into the
real jaxdiff networks (each activates by itself once its module exists)."""
from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _convert_reference_models as ref  # noqa: E402
from jaxdiff.convert import (  # noqa: E402
    REGISTRY,
    MissingComponentsError,
    PickleCheckpointError,
    find_weights,
    load_component,
    load_model_folder,
    missing_components,
    open_safetensors,
    read_component_config,
    read_model_index,
    require_components,
)

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd") / "pipe"
    return root, ref.save_sd_pipeline(root)


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def _assert_same_tensors(tensors, module: "torch.nn.Module"):
    state = {k: v.detach() for k, v in module.state_dict().items()}
    assert set(tensors.keys()) <= set(state)
    for k in tensors.keys():
        want = state[k].float().numpy()
        assert tensors.shapes[k] == tuple(want.shape), k
        np.testing.assert_array_equal(np.asarray(tensors[k], dtype=np.float32), want, err_msg=k)


def test_pipeline_folder_discovery(sd_pipeline):
    root, pipe = sd_pipeline
    pf = require_components(root)
    assert pf.class_name == "StableDiffusionPipeline"
    assert sorted(pf.present()) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert pf.components["unet"] == ("diffusers", "UNet2DConditionModel")
    assert pf.components["text_encoder"] == ("transformers", "CLIPTextModel")
    assert pf.components["safety_checker"] == (None, None)
    assert read_component_config(root, "scheduler")["_class_name"] == "PNDMScheduler"
    assert read_component_config(root, "unet")["cross_attention_dim"] == 8
    for name in ("unet", "vae", "text_encoder"):
        with open_safetensors(find_weights(root / name)) as tensors:
            _assert_same_tensors(tensors, getattr(pipe, name))


def test_missing_components_in_saved_pipeline(sd_pipeline, tmp_path):
    root = _copy(sd_pipeline[0], tmp_path)
    shutil.rmtree(root / "vae")
    (root / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(MissingComponentsError) as err:
        require_components(root)
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("text_encoder (CLIPTextModel): no safetensors weights")
    assert problems[1] == "vae (AutoencoderKL): folder vae/ is missing"
    assert missing_components(root, ["unet", "scheduler", "tokenizer"]) == []


def test_pickle_saved_component_refused(sd_pipeline, tmp_path):
    root = _copy(sd_pipeline[0], tmp_path)
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    sd_pipeline[1].unet.save_pretrained(str(root / "unet"), safe_serialization=False)
    assert (root / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(PickleCheckpointError, match="diffusion_pytorch_model.bin.*can run arbitrary code"):
        find_weights(root / "unet")
    assert "only pickle weights" in missing_components(root)[0]


def test_sharded_and_fp16_variant_saves(sd_pipeline, tmp_path):
    unet = sd_pipeline[1].unet
    unet.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    index = find_weights(tmp_path / "sharded")
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    with open_safetensors(index) as tensors:
        assert len(tensors.shards) > 1
        _assert_same_tensors(tensors, unet)

    half = ref.build("UNet2DConditionModel").to(torch.float16)
    half.save_pretrained(str(tmp_path / "fp16"), variant="fp16")
    half.save_pretrained(str(tmp_path / "fp16sharded"), variant="fp16", max_shard_size="40KB")
    assert find_weights(tmp_path / "fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    assert find_weights(tmp_path / "fp16sharded", "fp16").name == "diffusion_pytorch_model.safetensors.index.fp16.json"
    with open_safetensors(find_weights(tmp_path / "fp16sharded", "fp16")) as tensors:
        assert set(tensors.dtypes.values()) == {"F16"}
        _assert_same_tensors(tensors, half)


# ---- End-to-end loads into the real networks: skipped until each module exists. ----------------

def _network_available(class_name: str) -> bool:
    try:
        REGISTRY[class_name].resolve()
    except NotImplementedError:
        return False
    return True


def _abs_sum_and_count(params) -> tuple[float, int]:
    leaves = [np.asarray(x, dtype=np.float64) for x in params]
    return float(sum(np.abs(x).sum() for x in leaves)), int(sum(x.size for x in leaves))


@pytest.mark.parametrize("class_name", sorted(REGISTRY))
def test_real_network_loads_saved_reference(class_name, tmp_path):
    pytest.importorskip(REGISTRY[class_name].module)
    if not _network_available(class_name):
        pytest.skip(f"{REGISTRY[class_name].module} has no {class_name} yet")
    model = ref.build(class_name)
    model.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    net = load_model_folder(tmp_path / "m")
    got_sum, got_count = _abs_sum_and_count(jnp.asarray(x, jnp.float32) for x in jax_leaves(net))
    want_sum, want_count = _abs_sum_and_count(p.detach().numpy() for p in model.parameters())
    assert got_count == want_count
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)  # every weight arrived (transposes preserve |w|)

    half = load_model_folder(tmp_path / "m", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax_leaves(half) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}


def jax_leaves(module):
    return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]


@pytest.mark.parametrize("name", ["unet", "vae", "text_encoder"])
def test_pipeline_component_loads(sd_pipeline, name):
    root, pipe = sd_pipeline
    class_name = read_model_index(root).components[name][1]
    pytest.importorskip(REGISTRY[class_name].module)
    if not _network_available(class_name):
        pytest.skip(f"{REGISTRY[class_name].module} has no {class_name} yet")
    net = load_component(root, name)
    got_sum, got_count = _abs_sum_and_count(jax_leaves(net))
    want_sum, want_count = _abs_sum_and_count(p.detach().numpy() for p in getattr(pipe, name).parameters())
    assert got_count == want_count
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)


def test_unavailable_network_error_is_clear(sd_pipeline):
    root, _ = sd_pipeline
    if _network_available("UNet2DConditionModel"):
        pytest.skip("jaxdiff.models.unet exists")
    with pytest.raises(NotImplementedError, match="jaxdiff.models.unet"):
        load_component(root, "unet")


def test_non_network_component_rejected(sd_pipeline):
    with pytest.raises(ValueError, match="scheduler .*PNDMScheduler.*read_component_config"):
        load_component(sd_pipeline[0], "scheduler")


def test_truncated_component_reported_with_the_others(sd_pipeline, tmp_path):
    root = _copy(sd_pipeline[0], tmp_path)
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: full // 2])  # an interrupted download
    shutil.rmtree(root / "scheduler")
    with pytest.raises(MissingComponentsError) as err:
        require_components(root)
    scheduler, unet = err.value.problems  # in model_index.json order
    assert "unet (UNet2DConditionModel)" in unet and "truncated" in unet
    assert f"is {full // 2} bytes" in unet
    assert scheduler == "scheduler (PNDMScheduler): folder scheduler/ is missing"
