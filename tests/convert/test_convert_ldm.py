"""Original (LDM-layout) single-file Stable Diffusion checkpoints: SD 1.x (CLIP) and SD 2.x (OpenCLIP).

Tiny random diffusers pipelines are exported to the original layout by a writer written here from the
original module structure (``openaimodel.py``, ``model.py``, OpenCLIP), the inverse of the loader. The
writer is checked independently: diffusers' own ``from_single_file`` must read its file back to the
original tensors. jaxdiff then loads the file (configs inferred from shapes, or given) and must equal
the folder's networks exactly and diffusers' pipeline image within the parity tolerance.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxdiff.cli import main  # noqa: E402
from jaxdiff.convert import PickleCheckpointError, load_component  # noqa: E402
from jaxdiff.convert import ldm  # noqa: E402
from jaxdiff.models.tokenizers import open_clip_bpe_path  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-3  # the pipeline parity tolerance of tests/pipelines/test_sd_parity.py
TEXT = 64   # text width: one 64-channel head, as the inference conventions assume


# ---- tiny diffusers pipelines -------------------------------------------------------------------

def _tokenizer(pad: str | None):
    from jaxdiff.models.tokenizers import clip_vocab, read_bpe_merges

    path = open_clip_bpe_path()
    if path is None:
        pytest.skip("open_clip_torch's BPE file is not installed (pip install --no-deps open_clip_torch)")
    merges = read_bpe_merges(path)
    extra = {} if pad is None else {"pad_token": pad}
    return transformers.CLIPTokenizer(vocab=clip_vocab(merges), merges=merges, model_max_length=77, **extra)


def _pipeline(version: int):
    """SD 1.x: conv proj_in, 8 heads, 2 layers per block, CLIP text (quick_gelu). SD 2.x: linear projections,
    64-channel heads, 2-deep transformers, every level attending, OpenCLIP-style text (gelu), v-prediction."""
    torch.manual_seed(version)
    if version == 1:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32, cross_attention_dim=TEXT,
            attention_head_dim=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        act, pad, prediction = "quick_gelu", None, "epsilon"
    else:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32, cross_attention_dim=TEXT,
            attention_head_dim=(1, 2), use_linear_projection=True, transformer_layers_per_block=2, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
        act, pad, prediction = "gelu", "!", "v_prediction"
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), norm_num_groups=32, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=TEXT, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, vocab_size=49408,
        max_position_embeddings=77, projection_dim=TEXT, hidden_act=act))
    scheduler = diffusers.DDIMScheduler(**{k: v for k, v in ldm.DEFAULT_SCHEDULER.items() if not k.startswith("_")}
                                        | {"prediction_type": prediction})
    with torch.no_grad():  # diffusers zero-initialises some output layers: make every tensor informative
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=_tokenizer(pad), unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return pipe.to(torch.float32)


# ---- the writer: diffusers names -> original names ----------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _move(src: dict, out: dict, old: str, new: str, rename=None) -> None:
    """Every ``src`` key under ``old.`` stored under ``new.`` (``rename`` maps the first remaining name)."""
    for k in [k for k in src if k.startswith(old + ".")]:
        rest = k[len(old) + 1:]
        if rename is not None:
            head, _, tail = rest.partition(".")
            rest = f"{rename.get(head, head)}.{tail}"
        out[f"{new}.{rest}"] = src.pop(k)


def unet_to_ldm(sd: dict, cfg) -> dict:
    """openaimodel.UNetModel: input_blocks (conv_in, then per level its layers and a downsampler), middle_block
    (resnet, transformer, resnet), output_blocks (per level layers+1, the last one with the upsampler)."""
    sd, out, p = dict(sd), {}, "model.diffusion_model"
    _move(sd, out, "conv_in", f"{p}.input_blocks.0.0")
    _move(sd, out, "time_embedding.linear_1", f"{p}.time_embed.0")
    _move(sd, out, "time_embedding.linear_2", f"{p}.time_embed.2")
    _move(sd, out, "conv_norm_out", f"{p}.out.0")
    _move(sd, out, "conv_out", f"{p}.out.2")
    levels, layers, i = len(cfg.block_out_channels), cfg.layers_per_block, 1
    for b in range(levels):
        for j in range(layers):
            _move(sd, out, f"down_blocks.{b}.resnets.{j}", f"{p}.input_blocks.{i}.0", _RESNET)
            _move(sd, out, f"down_blocks.{b}.attentions.{j}", f"{p}.input_blocks.{i}.1")
            i += 1
        if b < levels - 1:
            _move(sd, out, f"down_blocks.{b}.downsamplers.0.conv", f"{p}.input_blocks.{i}.0.op")
            i += 1
    _move(sd, out, "mid_block.resnets.0", f"{p}.middle_block.0", _RESNET)
    _move(sd, out, "mid_block.attentions.0", f"{p}.middle_block.1")
    _move(sd, out, "mid_block.resnets.1", f"{p}.middle_block.2", _RESNET)
    i = 0
    for b in range(levels):
        for j in range(layers + 1):
            _move(sd, out, f"up_blocks.{b}.resnets.{j}", f"{p}.output_blocks.{i}.0", _RESNET)
            attn = any(k.startswith(f"up_blocks.{b}.attentions.{j}.") for k in sd)
            _move(sd, out, f"up_blocks.{b}.attentions.{j}", f"{p}.output_blocks.{i}.1")
            if j == layers:
                _move(sd, out, f"up_blocks.{b}.upsamplers.0.conv", f"{p}.output_blocks.{i}.{2 if attn else 1}.conv")
            i += 1
    assert not sd, f"writer left U-Net tensors: {sorted(sd)[:5]}"
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(sd: dict, cfg) -> dict:
    """ldm.modules.diffusionmodules.model Encoder/Decoder: down.i.block.j, mid.block_1/attn_1/block_2, up.i
    numbered from the lowest resolution, attention as 1x1 convolutions, nin_shortcut."""
    sd, out, p = dict(sd), {}, "first_stage_model"
    n = len(cfg.block_out_channels)
    for side in ("encoder", "decoder"):
        _move(sd, out, f"{side}.conv_norm_out", f"{p}.{side}.norm_out")
        for k in range(2):
            _move(sd, out, f"{side}.mid_block.resnets.{k}", f"{p}.{side}.mid.block_{k + 1}",
                  {"conv_shortcut": "nin_shortcut"})
        for k in [k for k in sd if k.startswith(f"{side}.mid_block.attentions.0.")]:
            rest = k.split("attentions.0.")[1].replace("to_out.0", "to_out")
            head, _, tail = rest.partition(".")
            value = sd.pop(k)
            out[f"{p}.{side}.mid.attn_1.{_VAE_ATTN[head]}.{tail}"] = value[:, :, None, None] if value.ndim == 2 else value
    for b in range(n):
        _move(sd, out, f"encoder.down_blocks.{b}.downsamplers.0", f"{p}.encoder.down.{b}.downsample")
        for j in range(cfg.layers_per_block):
            _move(sd, out, f"encoder.down_blocks.{b}.resnets.{j}", f"{p}.encoder.down.{b}.block.{j}",
                  {"conv_shortcut": "nin_shortcut"})
        _move(sd, out, f"decoder.up_blocks.{b}.upsamplers.0", f"{p}.decoder.up.{n - 1 - b}.upsample")
        for j in range(cfg.layers_per_block + 1):
            _move(sd, out, f"decoder.up_blocks.{b}.resnets.{j}", f"{p}.decoder.up.{n - 1 - b}.block.{j}",
                  {"conv_shortcut": "nin_shortcut"})
    for k in list(sd):  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        out[f"{p}.{k}"] = sd.pop(k)
    return out


def clip_to_ldm(sd: dict) -> dict:
    """SD 1.x: transformers' CLIPTextModel under cond_stage_model.transformer.text_model. (plus position_ids)."""
    out = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def open_clip_to_ldm(sd: dict, extra_layer: dict, projection) -> dict:
    """SD 2.x: OpenCLIP's text tower with one more resblock than SD uses (it reads the penultimate layer), fused
    in_proj (q; k; v rows), text_projection (width, embed) and logit_scale."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for k, v in extra_layer.items():
        sd[f"encoder.layers.{len(layers)}.{k}"] = v
    p = "cond_stage_model.model"
    out = {f"{p}.token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           f"{p}.positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           f"{p}.ln_final.weight": sd.pop("final_layer_norm.weight"), f"{p}.ln_final.bias": sd.pop("final_layer_norm.bias"),
           f"{p}.text_projection": projection, f"{p}.logit_scale": torch.tensor(4.6052)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(len(layers) + 1):
        src, dst = f"encoder.layers.{i}", f"{p}.transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}.self_attn.{q}_proj.{kind}") for q in "qkv"])
            for old, new in names.items():
                out[f"{dst}.{new}.{kind}"] = sd.pop(f"{src}.{old}.{kind}")
    assert not sd, f"writer left text tensors: {sorted(sd)[:5]}"
    return out


def export_ldm(pipe, path: Path, version: int) -> Path:
    from safetensors.torch import save_file

    tensors = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
               **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)}
    text = pipe.text_encoder.state_dict()
    if version == 1:
        tensors.update(clip_to_ldm(text))
    else:
        g = torch.Generator().manual_seed(5)
        extra = {k.split(".", 3)[3]: torch.randn(v.shape, generator=g) for k, v in text.items()
                 if ".layers.0." in f".{k.removeprefix('text_model.')}"}
        tensors.update(open_clip_to_ldm(text, extra, torch.randn(TEXT, 48, generator=g)))
    tensors.update({"alphas_cumprod": torch.from_numpy(pipe.scheduler.alphas_cumprod.numpy()),
                    "model_ema.decay": torch.tensor(0.9999)})  # buffers original files carry
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """version -> (version, diffusers pipeline, its saved folder, its LDM single file), built once per module."""
    made: dict[int, tuple] = {}

    def make(version: int) -> tuple:
        if version not in made:
            root = tmp_path_factory.mktemp(f"sd{version}")
            pipe = _pipeline(version)
            pipe.save_pretrained(str(root / "folder"), safe_serialization=True)
            made[version] = version, pipe, root / "folder", export_ldm(pipe, root / "model.safetensors", version)
        return made[version]

    return make


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def case(request, cases):
    return cases(request.param)


# ---- the writer, checked by diffusers -------------------------------------------------------------

def test_writer_is_read_back_by_diffusers_from_single_file(case):
    version, pipe, folder, path = case
    back = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                              safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        ref, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(got) == set(ref), name
        for k, v in ref.items():
            assert torch.equal(got[k].reshape(v.shape), v), f"{name}.{k}"


# ---- jaxdiff reads the file ----------------------------------------------------------------------

def _states_equal(a, b) -> None:
    from flax import nnx

    fa, fb = dict(nnx.to_flat_state(nnx.state(a, nnx.Param))), dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k].get_value()), np.asarray(fb[k].get_value()), err_msg=str(k))


def test_inferred_configs_match_the_folder(case):
    version, pipe, folder, path = case
    from jaxdiff.convert import open_safetensors

    with open_safetensors(path) as f:
        configs = ldm.infer_configs(f.shapes)
    for name in ("unet", "vae", "text_encoder"):
        ref = json.loads((folder / name / "config.json").read_text())
        keys = [k for k in configs[name] if k in ref and k not in ("sample_size", "_class_name", "architectures",
                                                                    "eos_token_id", "projection_dim")]
        got = {k: configs[name][k] for k in keys}
        want = {k: ref[k] for k in keys}
        assert got == want, name
    assert configs["scheduler"]["prediction_type"] == ("epsilon" if version == 1 else "v_prediction")


def test_networks_equal_the_folder_networks(case):
    """Configs inferred, then given (SD 1.x: a dict of configs; SD 2.x: the diffusers folder)."""
    version, pipe, folder, path = case
    given = folder if version == 2 else {
        n: json.loads((folder / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder")}
    reference = {name: load_component(folder, name) for name in ("unet", "vae", "text_encoder")}
    for config in (None, given):
        nets = ldm.load_ldm_checkpoint(path, config)
        assert nets.text_kind == ("clip" if version == 1 else "open_clip")
        for name in ("unet", "vae", "text_encoder"):
            _states_equal(getattr(nets, name), reference[name])


def _diffusers_images(pipe, prompts, negative, seeds, steps, guidance):
    """diffusers' images from jaxdiff's start noise for each seed (16x16, latents 8x8x4)."""
    from jaxdiff.pipelines.stable_diffusion import noise_for_seed

    noise = np.stack([np.asarray(noise_for_seed(np.uint32(s), (8, 8, 4))) for s in seeds])
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                height=16, width=16, latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
                output_type="np").images


def test_sd2_single_file_pipeline_matches_diffusers(cases):
    """OpenCLIP penultimate layer, '!' padding, linear projections, v-prediction: all inferred from the file."""
    version, pipe, folder, path = cases(2)
    sd = StableDiffusion.from_pretrained(path)
    assert sd.models.prediction == "v_prediction"
    prompts, negative, seeds = ["a photo of a cat", "a red car"], ["", "blurry"], [3, 4]
    out = sd(prompts, negative=negative, steps=3, sampler="ddim", guidance=5.0, seed=seeds, height=16, width=16)
    ref = _diffusers_images(pipe, prompts, negative, seeds, 3, 5.0)
    assert ref.std() > 0.02
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_sd2_512_base_is_chosen_by_prediction_type_and_size(cases, tmp_path):
    version, pipe, folder, path = cases(2)
    sd = StableDiffusion.from_single_file(path, prediction_type="epsilon", image_size=512)
    assert sd.models.prediction == "epsilon" and sd.default_size == 512
    assert StableDiffusion.from_single_file(path).default_size == 768  # the 768-v default, as diffusers
    settings = tmp_path / "base.json"
    settings.write_text(json.dumps({"prediction_type": "epsilon", "image_size": 512}))
    nets = ldm.load_ldm_checkpoint(path, settings)
    assert nets.configs["scheduler"]["prediction_type"] == "epsilon" and nets.configs["vae"]["sample_size"] == 512


# ---- errors and the command line ------------------------------------------------------------------

def test_ckpt_is_refused_with_a_conversion_that_works(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not opened")
    with pytest.raises(PickleCheckpointError, match="state_dict"):
        StableDiffusion.from_pretrained(ckpt)
    with pytest.raises(PickleCheckpointError):
        ldm.load_ldm_checkpoint(ckpt)


def test_diffusers_layout_single_file_points_to_the_loader(case, tmp_path):
    version, pipe, folder, path = case
    from jaxdiff.convert import load_single_file

    with pytest.raises(ValueError, match="from_single_file"):
        load_single_file(path, "unet", folder / "unet")


def test_cli_samples_an_sd1_single_file_as_diffusers_and_refuses_ckpt(cases, tmp_path, capsys):
    """SD 1.x end to end through the command line (configs, DDIM scheduler and CLIP tokenizer inferred): the PNGs
    are diffusers' images (8-bit rounding added to the tolerance); .ckpt: one line, exit 2, nothing written."""
    from PIL import Image

    version, pipe, folder, path = cases(1)
    out = tmp_path / "img.png"
    args = ["sample", "--model", str(path), "--prompt", "a photo of a cat", "--prompt", "a red car", "--steps", "3",
            "--guidance", "5", "--seed", "3", "--height", "16", "--width", "16", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    got = np.stack([np.asarray(Image.open(out.with_name(f"img-{i:03d}.png")), np.float32) / 255 for i in range(2)])
    ref = _diffusers_images(pipe, ["a photo of a cat", "a red car"], ["", ""], [3, 4], 3, 5.0)
    assert ref.std() > 0.02
    np.testing.assert_allclose(got, ref, atol=TOL + 0.5 / 255, rtol=0)
    out2 = tmp_path / "with_config.png"
    assert main(args[:-3] + ["--out", str(out2), "--config", str(folder), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(out2.with_name("with_config-000.png"))),
                          np.asarray(Image.open(out.with_name("img-000.png"))))
    from jaxdiff.images import read_settings

    assert read_settings(out2)["config"] == str(folder.resolve())  # --from-png passes it on
    assert read_settings(out)["config"] is None
    capsys.readouterr()
    assert main(["info", "--model", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)["model"]
    assert summary["text_encoder"] == "clip"
    assert summary["inferred_configs"]["unet"]["block_out_channels"] == list(pipe.unet.config.block_out_channels)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04")
    capsys.readouterr()
    assert main(["sample", "--model", str(ckpt), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pickle" in err and ".safetensors" in err
    assert not (tmp_path / "x.png").exists()


# ---- the inference conventions at the real sizes (meta tensors: shapes only, no memory) ---------------

REAL = {
    1: dict(unet=dict(cross_attention_dim=768, attention_head_dim=8),
            text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="quick_gelu")),
    2: dict(unet=dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
            text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      hidden_act="gelu")),
}


@pytest.mark.parametrize("version", [1, 2])
def test_configs_inferred_at_stable_diffusion_sizes(version):
    """SD 1.5 / SD 2.1 architectures (diffusers' and transformers' configs of the public models) written to the
    original layout as meta tensors: the inferred configs are those configs."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**REAL[version]["unet"])
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                                      **REAL[version]["text"]))
    tensors = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    sd = text.state_dict()
    if version == 1:
        tensors.update(clip_to_ldm(sd))
    else:
        extra = {k.split(".", 3)[3]: v for k, v in sd.items() if k.startswith("encoder.layers.0.")}
        tensors.update(open_clip_to_ldm(sd, extra, torch.empty(1024, 1024, device="meta")))
    configs = ldm.infer_configs({k: tuple(v.shape) for k, v in tensors.items()})
    for got, ref in ((configs["unet"], unet.config), (configs["vae"], vae.config), (configs["text_encoder"], text.config)):
        ref = ref if isinstance(ref, dict) else ref.to_dict()
        diff = {k: (v, ref[k]) for k, v in got.items() if k in ref and k not in ("_class_name", "architectures",
                "sample_size", "projection_dim", "eos_token_id") and _plain(v) != _plain(ref[k])}
        assert not diff
    assert configs["unet"]["sample_size"] == (64 if version == 1 else 96)


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def test_a_config_that_does_not_fit_is_named(cases):
    _, _, folder1, _ = cases(1)
    _, _, _, path2 = cases(2)
    with pytest.raises(ValueError, match="does not fit its config"):
        ldm.load_ldm_checkpoint(path2, folder1)
