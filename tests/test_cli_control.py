"""`jaxdiff sample` with ControlNets and T2I-Adapters: the CLI's image equals the Python API's with the same settings
(two ControlNets, an adapter and Canny preprocessing, inpainting), --from-png reproduces it exactly, and bad control
options fail with one clear line before (or, for an unfit ControlNet, while) loading."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import main
from jaxdiff.images import read_settings, to_uint8

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
NO = "--no-progress"
SIZE = 16
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def _controlnet(seed: int, folder: Path, channels: int = 8) -> Path:
    """A random diffusers ControlNet for the tiny U-Net (8 channels, one block, VAE factor 2), zero convs drawn."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel(in_channels=4, block_out_channels=(channels,), layers_per_block=1,
                                   norm_num_groups=4, cross_attention_dim=32, attention_head_dim=4,
                                   conditioning_embedding_out_channels=(4, 8),
                                   down_block_types=("CrossAttnDownBlock2D",))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(ZERO_INIT):
                p.normal_(0.0, 0.5)
    cn.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SD folder, two ControlNets (one unfit: 16 channels), a T2I-Adapter and 16x16 / 20x20 images."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import torch
    import _sd_folders

    root = tmp_path_factory.mktemp("cli_control")
    sd = _sd_folders.save(_sd_folders.build_pipeline(blocks=(8,), vae_blocks=(8, 8)), root / "tiny-sd")
    torch.manual_seed(4)
    adapter = diffusers.T2IAdapter(in_channels=3, channels=[8], num_res_blocks=1, downscale_factor=2,
                                   adapter_type="full_adapter").eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(3.0)
    adapter.save_pretrained(str(root / "adapter"), safe_serialization=True)
    rng = np.random.default_rng(0)
    out = dict(sd=sd, cn=_controlnet(1, root / "cn"), unfit=_controlnet(2, root / "cn16", channels=16),
               adapter=root / "adapter")
    for name, size in (("edges", 20), ("photo", SIZE), ("pose", SIZE), ("init", SIZE)):
        out[name] = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out[name])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 2:14] = 255
    out["mask"] = root / "mask.png"
    Image.fromarray(mask).save(out["mask"])
    return out


def _base(files, out: Path) -> list[str]:
    return ["sample", "--model", str(files["sd"]), "--prompt", "a photo of a cat", "--steps", "2", "--sampler", "ddim",
            "--guidance", "5", "--seed", "3", "--height", str(SIZE), "--width", str(SIZE), "--out", str(out), NO]


def _api(files, settings: dict, network_transform, **kw) -> np.ndarray:
    """The Python API's image: ``network_transform(sd)`` built by the test, the CLI's sampler and schedule."""
    sd = _sd(files)
    return sd(["a photo of a cat"], network_transform=network_transform(sd), steps=2, sampler=settings["sampler"],
              schedule=settings["schedule"], guidance=5.0, seed=[3], height=SIZE, width=SIZE, **kw)


_SD = {}


def _sd(files):
    """One StableDiffusion of the tiny folder for the module."""
    from jaxdiff.pipelines import StableDiffusion

    if "sd" not in _SD:
        _SD["sd"] = StableDiffusion.from_pretrained(files["sd"])
    return _SD["sd"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_controlnets_and_an_adapter_equal_the_api_and_reproduce(files, tmp_path, monkeypatch):
    """Two ControlNets (their own scales and ends, Canny edges of a photo for the second, guess mode) and
    a T2I-Adapter, inpainting: the CLI's image is the API's; --from-png remakes it from another folder (a control
    image given by a relative path, recorded as given, is found beside the PNG) and refuses a changed one.
    One compiled program for the module: other settings are checked by the API's own parity tests."""
    import shutil

    from jaxdiff.conditioning import chain
    from jaxdiff.control_images import canny, control_image
    from jaxdiff.convert.folders import load_model_folder
    from jaxdiff.images import load_image
    from jaxdiff.models.t2i_adapter import t2i_adapter
    from jaxdiff.pipelines.controlnet import controlnet_transform

    shutil.copy(files["edges"], tmp_path / "edges.png")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "multi.png"
    cn, ad = str(files["cn"]), str(files["adapter"])
    assert main([*_base(files, out), "--init-image", str(files["init"]), "--mask", str(files["mask"]),
                 "--controlnet", cn, "--controlnet", cn, "--adapter", ad, "--control", "edges.png",
                 "--control", str(files["photo"]), "--control", str(files["pose"]), "--control-preprocess", "none",
                 "--control-preprocess", "canny", "--control-preprocess", "none", "--control-scale", "2",
                 "--control-scale", "1.5", "--control-end", "1", "--control-end", "0.5", "--adapter-scale", "0.8",
                 "--guess-mode"]) == 0
    s = read_settings(out)
    assert {k: s[k] for k in ("controlnet", "control", "control_scale", "control_start", "control_end", "adapter",
                              "adapter_scale", "control_preprocess", "guess_mode")} == dict(
        controlnet=[cn, cn], control=["edges.png", str(files["photo"]), str(files["pose"])], control_scale=[2.0, 1.5],
        control_start=None, control_end=[1.0, 0.5], adapter=[ad], adapter_scale=[0.8],
        control_preprocess=["none", "canny", "none"], guess_mode=True)
    pil = lambda k: Image.open(files[k]).convert("RGB")  # noqa: E731
    edges_of_photo = np.asarray(control_image(canny(np.asarray(pil("photo"))[None])))
    adapter = load_model_folder(files["adapter"])

    def transform(scales):
        return lambda sd: chain(
            controlnet_transform(sd, [cn, cn], [pil("edges"), edges_of_photo], height=SIZE, width=SIZE, scale=scales,
                                 end=[1.0, 0.5], guess_mode=True),
            t2i_adapter(adapter, pil("pose"), 0.8))

    inpaint = dict(image=load_image(files["init"]), mask=load_image(files["mask"], grayscale=True), strength=1.0)
    ref = _api(files, s, transform([2.0, 1.5]), **inpaint)
    np.testing.assert_array_equal(_png(out), to_uint8(ref[0]))
    plain = _api(files, s, transform([0.0, 0.0]), **inpaint)
    assert np.abs(to_uint8(plain[0]).astype(int) - _png(out)).max() > 10  # the ControlNets change the image
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again), NO]) == 0
    np.testing.assert_array_equal(_png(again), _png(out))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "edges.png")
    assert main(["sample", "--from-png", str(out), "--out", str(tmp_path / "third.png"), NO]) == 2
    assert not (tmp_path / "third.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--controlnet", "{cn}"], "--controlnet needs --control IMAGE"),
    (["--control", "{edges}"], "--control needs --controlnet PATH or --adapter PATH"),
    (["--controlnet", "{cn}", "--controlnet", "{cn}", "--control", "{edges}", "--control-scale", "1",
      "--control-scale", "1", "--control-scale", "1"], "--control-scale is given 3 times for 2 ControlNets"),
    (["--controlnet", "{cn}", "--control", "{edges}", "--control", "{edges}"],
     "2 --control images for 1 ControlNet(s) and 0 adapter(s)"),
    (["--controlnet", "{cn}", "--control", "{edges}", "--control-start", "0.6", "--control-end", "0.6"],
     "must satisfy 0 <= start < end <= 1"),
    (["--controlnet", "{cn}", "--control", "{root}/missing.png"], "missing.png does not exist"),
    (["--controlnet", "{root}/nothing", "--control", "{edges}"], "nothing does not exist"),
    (["--controlnet", "{root}/control_sd15_canny.pth", "--control", "{edges}"], "pickle"),
    (["--adapter", "{adapter}", "--control", "{edges}", "--control-scale", "2"], "use --adapter-scale"),
    (["--adapter", "{adapter}", "--control", "{edges}", "--guess-mode"], "--guess-mode needs --controlnet"),
    (["--controlnet", "{unfit}", "--control", "{edges}"], "ControlNet 0 has block_out_channels=(16,)"),
])
def test_bad_control_options_fail_with_one_line(files, tmp_path, capsys, extra, message):
    names = {k: str(v) for k, v in files.items()} | {"root": str(files["sd"].parent)}
    assert main([*_base(files, tmp_path / "x.png"), *[a.format(**names) for a in extra]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_control_options_do_not_apply_to_other_models(capsys):
    assert main(["sample", "--model", "mixture2d", "--controlnet", "x", "--control", "y.png", NO]) == 2
    assert "does not apply to the mixture2d" in capsys.readouterr().err
