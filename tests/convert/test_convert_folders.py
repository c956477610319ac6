"""Pipeline folders, single files, dtype casting and mismatch errors, with a tiny stand-in network."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import _convert_tiny as tiny
from jaxdiff.convert import (
    CheckpointMismatchError,
    MissingComponentsError,
    NetworkSpec,
    PickleCheckpointError,
    find_weights,
    load_component,
    load_model_folder,
    load_single_file,
    missing_components,
    read_component_config,
    read_model_index,
    require_components,
)
from jaxdiff.convert.folders import config_class, network_class, resolve_dtype

REG = {"TinyNet": NetworkSpec(tiny.__name__, "TinyNet")}
CFG = tiny.TinyNetConfig()


def _write_model(folder: Path, config: dict, tensors: dict, name: str = "diffusion_pytorch_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / name))
    return folder


def _tiny_config(**over) -> dict:
    return {"_class_name": "TinyNet", "in_channels": 3, "width": 8, "depth": 2, "vocab_size": 10, "unused_key": 1, **over}


def _params(module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _check_filled(net, tensors, dtype=np.float32):
    """Every parameter equals its checkpoint tensor in jax layout, cast to ``dtype``."""
    got = _params(net)
    want = {
        "conv_in.kernel": tensors["conv_in.weight"].transpose(2, 3, 1, 0),
        "conv_in.bias": tensors["conv_in.bias"],
        "norm.scale": tensors["norm.weight"],
        "norm.bias": tensors["norm.bias"],
        "embed.embedding": tensors["embed.weight"],
        **{f"blocks.{i}.kernel": tensors[f"blocks.{i}.weight"].T for i in range(2)},
        **{f"blocks.{i}.bias": tensors[f"blocks.{i}.bias"] for i in range(2)},
    }
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == dtype, k
        np.testing.assert_array_equal(got[k], v.astype(dtype), err_msg=k)


@pytest.fixture()
def pipeline(tmp_path):
    """A pipeline folder: a TinyNet 'unet', a scheduler, a tokenizer, a null safety checker."""
    root = tmp_path / "pipe"
    tensors = tiny.torch_layout_tensors(CFG)
    _write_model(root / "unet", _tiny_config(), tensors)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "TinyPipeline", "requires_safety_checker": False,
        "unet": ["jaxdiff", "TinyNet"], "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
    }))
    return root, tensors


def test_model_index_and_component_config(pipeline):
    root, _ = pipeline
    pf = read_model_index(root)
    assert pf.class_name == "TinyPipeline"
    assert pf.components["unet"] == ("jaxdiff", "TinyNet")
    assert pf.components["safety_checker"] == (None, None)
    assert pf.attributes == {"requires_safety_checker": False}
    assert sorted(pf.present()) == ["scheduler", "tokenizer", "unet"]
    assert read_component_config(root, "scheduler")["num_train_timesteps"] == 1000
    assert require_components(root).root == root


def test_load_component_fills_every_parameter(pipeline):
    root, tensors = pipeline
    net = load_component(root, "unet", registry=REG)
    assert isinstance(net, tiny.TinyNet)
    _check_filled(net, tensors)
    out = net(jnp.ones((1, 4, 4, 3)), jnp.array([1]))  # the filled module runs
    assert out.shape == (1, 8) and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("dtype,np_dtype", [(jnp.bfloat16, jnp.bfloat16), ("fp16", np.float16), (jnp.float32, np.float32)])
def test_dtype_cast_per_tensor(pipeline, dtype, np_dtype):
    root, tensors = pipeline
    net = load_component(root, "unet", dtype=dtype, registry=REG)
    _check_filled(net, tensors, np.dtype(np_dtype))
    assert net.blocks[0].dtype == np.dtype(np_dtype)  # compute dtype follows


def test_unsupported_dtype():
    with pytest.raises(ValueError, match="unsupported dtype.*bfloat16"):
        resolve_dtype(jnp.int8)
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("float8")


def test_missing_components_named_together(pipeline):
    root, _ = pipeline
    (root / "scheduler" / "scheduler_config.json").unlink()
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    problems = missing_components(root, ["unet", "vae", "scheduler", "tokenizer", "safety_checker"])
    assert [p.split(":")[0].split(" ")[0] for p in problems] == ["unet", "vae", "scheduler", "safety_checker"]
    with pytest.raises(MissingComponentsError) as err:
        require_components(root, ["unet", "vae", "scheduler", "tokenizer"])
    msg = str(err.value)
    assert "3 required component(s)" in msg
    assert "unet (TinyNet): no safetensors weights" in msg
    assert "vae: not listed in model_index.json" in msg
    assert "scheduler/scheduler_config.json is missing" in msg
    assert "tokenizer" not in msg.split("unusable:")[1].split("re-save")[0]
    with pytest.raises(MissingComponentsError, match="unet"):
        load_component(root, "unet", registry=REG)


def test_missing_folder_and_config(pipeline):
    root, _ = pipeline
    (root / "unet" / "config.json").unlink()
    import shutil

    shutil.rmtree(root / "tokenizer")
    assert missing_components(root) == ["unet (TinyNet): unet/config.json is missing",
                                        "tokenizer (CLIPTokenizer): folder tokenizer/ is missing"]


def test_not_a_pipeline_folder(tmp_path):
    _write_model(tmp_path / "m", _tiny_config(), tiny.torch_layout_tensors(CFG))
    with pytest.raises(FileNotFoundError, match="no model_index.json.*load_model_folder"):
        read_model_index(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_model_index(tmp_path / "nothing")


def test_pickle_only_component_refused(pipeline):
    root, _ = pipeline
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    problems = missing_components(root)
    assert problems and "only pickle weights" in problems[0] and "safe_serialization=True" in problems[0]
    with pytest.raises(PickleCheckpointError, match="can run arbitrary code"):
        find_weights(root / "unet")
    with pytest.raises(PickleCheckpointError):
        load_model_folder(root / "unet", registry=REG)


def test_pickle_single_file_refused(tmp_path):
    for name in ("v1-5-pruned.ckpt", "model.pth", "weights.pt", "x.pkl", "pytorch_model.bin"):
        with pytest.raises(PickleCheckpointError, match="safetensors only"):
            load_single_file(tmp_path / name, "TinyNet", _tiny_config(), registry=REG)


def test_config_weights_mismatch_lists_names(tmp_path):
    folder = _write_model(tmp_path / "m", _tiny_config(), tiny.torch_layout_tensors(CFG))
    (folder / "config.json").write_text(json.dumps(_tiny_config(depth=3, width=16)))
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_folder(folder, registry=REG)
    msg = str(err.value)
    assert "missing from checkpoint (2): blocks.2.bias, blocks.2.weight" in msg
    assert "conv_in.weight: checkpoint (8, 3, 3, 3), model expects (3, 3, 3, 16)" in msg
    (folder / "config.json").write_text(json.dumps(_tiny_config(depth=1)))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in checkpoint \(2\): blocks.1.bias, blocks.1.weight"):
        load_model_folder(folder, registry=REG)


def test_variants_and_shards(tmp_path):
    t32 = tiny.torch_layout_tensors(CFG, seed=1)
    t16 = tiny.torch_layout_tensors(CFG, seed=2, dtype=np.float16)
    folder = _write_model(tmp_path / "m", _tiny_config(), t16, name="diffusion_pytorch_model.fp16.safetensors")
    assert find_weights(folder).name == "diffusion_pytorch_model.fp16.safetensors"  # the only weights: fallback
    _check_filled(load_model_folder(folder, registry=REG), t16)  # fp16 file, float32 module: upcast
    save_file(t32, str(folder / "diffusion_pytorch_model.safetensors"))
    assert find_weights(folder).name == "diffusion_pytorch_model.safetensors"
    assert find_weights(folder, "fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    with pytest.raises(FileNotFoundError, match="bf16"):
        find_weights(folder, "bf16")

    sharded = tmp_path / "s"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps({**_tiny_config(), "_class_name": None, "architectures": ["TinyNet"]}))
    names = sorted(t32)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: t32[k] for k in keys}, str(sharded / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert find_weights(sharded).name == "model.safetensors.index.json"
    _check_filled(load_model_folder(sharded, registry=REG), t32)  # class from transformers' "architectures"


def test_single_file_with_prefix_and_original_layout(tmp_path):
    tensors = tiny.torch_layout_tensors(CFG, seed=3)
    path = tmp_path / "net.safetensors"
    save_file(tensors, str(path))
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config()))
    _check_filled(load_single_file(path, "TinyNet", tmp_path, registry=REG), tensors)

    prefixed = tmp_path / "all.safetensors"
    save_file({**{f"unet.{k}": v for k, v in tensors.items()}, "vae.x": np.ones(2, np.float32)}, str(prefixed))
    _check_filled(load_single_file(prefixed, "TinyNet", _tiny_config(), prefix="unet.", registry=REG), tensors)
    with pytest.raises(ValueError, match="no tensor .* prefix 'text.'"):
        load_single_file(prefixed, "TinyNet", _tiny_config(), prefix="text.", registry=REG)

    original = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.ones(2, np.float32)}, str(original))
    with pytest.raises(ValueError, match="original .*from_single_file"):
        load_single_file(original, "TinyNet", _tiny_config(), registry=REG)


def test_registry_resolution_errors():
    with pytest.raises(NotImplementedError, match="no network for 'Foo'.*UNet2DConditionModel"):
        network_class("Foo")
    with pytest.raises(NotImplementedError, match="no jaxdiff.models.not_there module"):
        network_class("X", {"X": NetworkSpec("jaxdiff.models.not_there", "X")})
    with pytest.raises(NotImplementedError, match="defines no class Nope"):
        network_class("X", {"X": NetworkSpec(tiny.__name__, "Nope")})
    assert network_class("TinyNet", REG) is tiny.TinyNet
    assert config_class(tiny.TinyNet) is tiny.TinyNetConfig  # from the constructor's annotation


def test_torch_twin_output_parity(tmp_path):
    """A checkpoint saved from the PyTorch twin loads into TinyNet and gives the same outputs."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    torch.manual_seed(0)
    twin = tiny.torch_twin(CFG)
    folder = tmp_path / "m"
    folder.mkdir()
    torch_save(twin.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(_tiny_config()))
    net = load_model_folder(folder, registry=REG)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    ids = np.array([3, 7])
    with torch.no_grad():
        ref = twin(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
    got = np.asarray(net(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids)))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_network_defined_builder_gets_both_dtypes(tmp_path):
    tensors = tiny.torch_layout_tensors(CFG, seed=4)
    folder = _write_model(tmp_path / "m", _tiny_config(_class_name="TinyNetCustom"), tensors)
    reg = {"TinyNetCustom": NetworkSpec(tiny.__name__, "TinyNetCustom")}
    net = load_model_folder(folder, dtype=jnp.bfloat16, registry=reg)
    assert type(net) is tiny.TinyNetCustom
    _check_filled(net, tensors, np.dtype(jnp.bfloat16))
    assert net.blocks[0].dtype == jnp.bfloat16
