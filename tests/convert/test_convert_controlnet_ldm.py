"""Original (lllyasviel) single-file ControlNets: a tiny random diffusers ControlNetModel written in the original
layout by this test's own inverse mapping (checked against diffusers' ``convert_controlnet_checkpoint``), then
loaded by jaxdiff from the .safetensors file (config inferred, with and without ``control_model.``, or given)
gives diffusers' residuals."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert.controlnet_ldm import infer_controlnet_config, load_controlnet_checkpoint  # noqa: E402
from jaxdiff.convert.safetensors_io import PickleCheckpointError  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402

TOL = 1e-4
LAYERS = 1
CONFIG = dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=LAYERS, cross_attention_dim=32,
              attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _torch_controlnet(seed: int, **overrides):
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel(**{**CONFIG, **overrides})
    with torch.no_grad():  # the zero convolutions drawn at random, so that every tensor shows in the outputs
        for name, p in cn.named_parameters():
            if name.startswith(ZERO_INIT):
                p.normal_(0.0, 0.3)
    return cn.to(torch.float32).eval()


def _original_name(name: str, n_blocks: int) -> str:
    """diffusers ControlNetModel name -> lllyasviel's cldm name (the inverse of the conversion)."""
    per = LAYERS + 1
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
             "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (n_blocks + 1)}.",
             "controlnet_mid_block.": "middle_block_out.0.", "mid_block.attentions.0.": "middle_block.1."}
    for old, new in fixed.items():
        if name.startswith(old):
            return new + name[len(old):]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", name):
        return f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", name):
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(.*)", name):
        return f"middle_block.{2 * int(m.group(1))}.{RESNET[m.group(2)]}.{m.group(3)}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", name):
        return f"input_blocks.{1 + int(m.group(1)) * per + int(m.group(2))}.0.{RESNET[m.group(3)]}.{m.group(4)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"input_blocks.{1 + int(m.group(1)) * per + int(m.group(2))}.1.{m.group(3)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op.{m.group(2)}"
    raise AssertionError(f"no original name for {name}")


def _original(cn, prefix: str) -> dict:
    n_blocks = len(cn.config.conditioning_embedding_out_channels) * 2 - 2
    return {prefix + _original_name(k, n_blocks): v.detach().clone().contiguous() for k, v in cn.state_dict().items()}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(diffusers net, {variant: written .safetensors path}); the prefixed file also bundles an SD U-Net tensor."""
    from safetensors.torch import save_file

    cn = _torch_controlnet(0)
    root = tmp_path_factory.mktemp("cn_ldm")
    paths = {}
    for variant, prefix in (("prefixed", "control_model."), ("bare", "")):
        sd = _original(cn, prefix)
        if prefix:
            sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)
        paths[variant] = root / f"control_{variant}.safetensors"
        save_file(sd, str(paths[variant]))
    return cn, paths


def test_inverse_mapping_is_what_diffusers_converts_back(nets):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    cn, _ = nets
    want = cn.state_dict()
    for prefix in ("control_model.", ""):
        got = convert_controlnet_checkpoint(_original(cn, prefix), dict(cn.config))
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), k


def _io(seed: int = 1):
    rng = np.random.default_rng(seed)
    return dict(sample=rng.normal(size=(1, 8, 8, 4)).astype(np.float32),
                text=rng.normal(size=(1, 5, 32)).astype(np.float32),
                cond=rng.uniform(size=(1, 64, 64, 3)).astype(np.float32), t=np.float32(417.0))


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


@jax.jit
def _call(model, *args):
    return model(*args)


def _run(model):
    """The module's residuals on _io(), compiled once per config (eager NNX compiles every op on its own)."""
    io = _io()
    return _call(PureModel.of(model), io["sample"], np.array([io["t"]]), io["text"], io["cond"])


def _assert_same_residuals(model, cn):
    io = _io()
    with torch.no_grad():
        down, mid = cn(_nchw(io["sample"]), torch.tensor(io["t"]), torch.from_numpy(io["text"]), _nchw(io["cond"]),
                       return_dict=False)
    res = _run(model)
    assert len(res.down) == len(down)
    for ours, ref in zip([*res.down, res.mid], [*down, mid]):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        assert np.abs(ref).max() > 0.1  # the residual is not trivially zero
        np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_single_file_controlnet_matches_diffusers(nets):
    """Config inferred, ``control_model.`` prefix and a bundled SD tensor (the bare file: same parameters, below)."""
    cn, paths = nets
    model = load_controlnet_checkpoint(paths["prefixed"])
    assert model.config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert model.config.block_out_channels == (32, 64)
    _assert_same_residuals(model, cn)


def test_inferred_config_reads_the_shapes(nets):
    from jaxdiff.convert import open_safetensors

    cn, paths = nets
    with open_safetensors(paths["bare"]) as t:
        cfg = infer_controlnet_config(t.shapes)
    want = cn.config
    for key in ("in_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                "conditioning_channels", "norm_num_groups"):
        assert cfg[key] == want[key], key
    for key in ("block_out_channels", "down_block_types", "conditioning_embedding_out_channels"):
        assert tuple(cfg[key]) == tuple(want[key]), key


def test_given_config_sets_what_the_shapes_cannot(tmp_path):
    """4 heads (not the SD 1.x 8 the shapes suggest) and a BGR channel order: only a config says so; given as the
    diffusers folder, its config.json, or a dict, it is used whole (the weights load into it; the residuals of a
    loaded module are checked above)."""
    from safetensors.torch import save_file

    cn = _torch_controlnet(2, attention_head_dim=4, controlnet_conditioning_channel_order="bgr")
    path = tmp_path / "control.safetensors"
    save_file(_original(cn, "control_model."), str(path))
    cn.save_config(str(tmp_path / "folder"))
    for config in (tmp_path / "folder", tmp_path / "folder" / "config.json", dict(cn.config)):
        cfg = load_controlnet_checkpoint(path, config).config
        assert (cfg.attention_head_dim, cfg.controlnet_conditioning_channel_order) == (4, "bgr")
    guessed = load_controlnet_checkpoint(path).config
    assert (guessed.attention_head_dim, guessed.controlnet_conditioning_channel_order) == (8, "rgb")
    with pytest.raises(ValueError, match="does not fit its config"):
        load_controlnet_checkpoint(path, {**cn.config, "block_out_channels": (32, 32)})


def test_load_controlnet_takes_a_file_and_refuses_pickles(nets, tmp_path):
    from jaxdiff.pipelines.controlnet import load_controlnet

    from flax import nnx

    _, paths = nets
    same = jax.tree_util.tree_map(np.array_equal, nnx.state(load_controlnet(paths["prefixed"])),
                                  nnx.state(load_controlnet_checkpoint(paths["bare"])))
    assert all(jax.tree_util.tree_leaves(same))
    for name in ("control_sd15_canny.pth", "control.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x02")
        with pytest.raises(PickleCheckpointError):
            load_controlnet(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_controlnet_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ValueError, match="not an original ControlNet"):
        load_controlnet_checkpoint(tmp_path / "sd.safetensors")
