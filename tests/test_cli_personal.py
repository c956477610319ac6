"""`jaxdiff sample --lora / --embedding / --hypernetwork`: the CLI's image equals the Python API's with the same
settings (a kohya LoRA on the U-Net and the text encoder, a two-vector embedding under a token of our choosing, a
hypernetwork, image-to-image), --from-png reproduces it exactly and refuses a changed file, and bad options fail
with one clear line (exit 2) and write nothing."""
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
PROMPT = "a photo of <toy> on a table"
MID = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # the tiny U-Net's attention is in its mid block
TE = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SD folder (one 8-channel block, text width 32) and a LoRA, an embedding, a hypernetwork built for it
    with the jaxdiff API and saved with its writers; an unfit LoRA and hypernetwork; a 16x16 init image."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import _sd_folders

    from jaxdiff import lora
    from jaxdiff import textual_inversion as ti
    from jaxdiff.models import hypernetwork as hnet
    from jaxdiff.pipelines import StableDiffusion

    root = tmp_path_factory.mktemp("cli_personal")
    folder = _sd_folders.save(_sd_folders.build_pipeline(blocks=(8,), vae_blocks=(8, 8)), root / "tiny-sd")
    sd = StableDiffusion.from_pretrained(folder)
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    adapter = lora.load_lora({f"unet.{MID}.lora_A.weight": normal(2, 32), f"unet.{MID}.lora_B.weight": normal(8, 2),
                              f"text_encoder.{TE}.lora_A.weight": normal(2, 32),
                              f"text_encoder.{TE}.lora_B.weight": normal(32, 2)}, sd)
    out = dict(sd=folder, lora=lora.save_lora(root / "style.safetensors", adapter, "kohya"),
               emb=ti.save_embedding(root / "learned_embeds.safetensors", ti.Embedding("<cat-toy>", 3 * normal(2, 32))),
               hn=hnet.save_hypernetwork(root / "hn.safetensors",
                                         hnet.init_hypernetwork([32, 8], activation="relu", std=0.5, seed=1)),
               unfit_hn=hnet.save_hypernetwork(root / "hn48.safetensors", hnet.init_hypernetwork([48], seed=2)))
    out["unfit_lora"] = root / "unfit.safetensors"  # a 7-wide LoRA for the 32-wide projection
    from jaxdiff.convert.export import write_safetensors

    write_safetensors(out["unfit_lora"], {f"lora_unet_{MID.replace('.', '_')}.lora_down.weight": normal(2, 7),
                                          f"lora_unet_{MID.replace('.', '_')}.lora_up.weight": normal(8, 2)}, {})
    out["init"] = root / "init.png"
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(out["init"])
    out["api_sd"] = sd
    return out


def _base(files, out: Path) -> list[str]:
    return ["sample", "--model", str(files["sd"]), "--prompt", PROMPT, "--steps", "2", "--sampler", "ddim",
            "--guidance", "5", "--seed", "3", "--height", str(SIZE), "--width", str(SIZE), "--out", str(out), NO]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_lora_embedding_hypernetwork_equal_the_api_and_reproduce(files, tmp_path, monkeypatch):
    """All three at once, image-to-image: the CLI's image is the API calls' (load_textual_inversion with the token,
    lora.apply at 0.8, hypernetworks at 0.7); each changes the image (API at scale 0 / strength 0 differs); the PNG
    records paths, values and sha256s; --from-png remakes it from another folder (the LoRA given by a relative path
    is found beside the PNG) and refuses a changed hypernetwork file."""
    import shutil

    from jaxdiff import conditioning, lora
    from jaxdiff import textual_inversion as ti
    from jaxdiff.images import load_image
    from jaxdiff.models import hypernetwork as hnet

    shutil.copy(files["lora"], tmp_path / "style.safetensors")
    hn_path = tmp_path / "hn.safetensors"
    shutil.copy(files["hn"], hn_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "personal.png"
    assert main([*_base(files, out), "--init-image", str(files["init"]), "--strength", "0.9",
                 "--lora", "style.safetensors:0.8", "--embedding", f"{files['emb']}:<toy>",
                 "--hypernetwork", f"{hn_path}:0.7"]) == 0
    s = read_settings(out)
    assert {k: s[k] for k in ("lora", "lora_scale", "embedding", "embedding_token", "hypernetwork",
                              "hypernetwork_strength")} == dict(
        lora=["style.safetensors"], lora_scale=[0.8], embedding=[str(files["emb"])], embedding_token=["<toy>"],
        hypernetwork=[str(hn_path)], hypernetwork_strength=[0.7])
    import hashlib

    assert s["lora_sha256"] == [hashlib.sha256(files["lora"].read_bytes()).hexdigest()]

    sd = ti.load_textual_inversion(files["api_sd"], files["emb"], "<toy>")
    adapter = lora.load_lora(files["lora"], files["api_sd"])
    hn = hnet.load_hypernetwork(files["hn"])

    def api(scale: float, strength: float) -> np.ndarray:
        sd_l, net = lora.apply(sd, [adapter], [scale])
        return to_uint8(sd_l([PROMPT], network_transform=conditioning.chain(net, hnet.hypernetworks((hn, strength))),
                             steps=2, sampler=s["sampler"], schedule=s["schedule"], guidance=5.0, seed=[3],
                             height=SIZE, width=SIZE, image=load_image(files["init"]), strength=0.9)[0])

    np.testing.assert_array_equal(_png(out), api(0.8, 0.7))
    for scale, strength in ((0.0, 0.7), (0.8, 0.0)):  # the LoRA and the hypernetwork each change the image
        assert np.abs(api(scale, strength).astype(int) - _png(out)).max() > 10
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again), NO]) == 0
    np.testing.assert_array_equal(_png(again), _png(out))
    shutil.copy(files["unfit_hn"], hn_path)
    assert main(["sample", "--from-png", str(out), "--out", str(tmp_path / "third.png"), NO]) == 2
    assert not (tmp_path / "third.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--lora", "{root}/style.ckpt"], "pickle file"),
    (["--lora", "{root}/missing.safetensors:0.5"], "missing.safetensors does not exist"),
    (["--lora", "{lora}:strong"], "'strong' is not a scale"),
    (["--lora", "{lora}:nan"], "the scale must be a finite number"),
    (["--hypernetwork", "{hn}:x"], "'x' is not a strength"),
    (["--hypernetwork", "{root}/none.pt"], "none.pt does not exist"),
    (["--embedding", "{root}/none.pt:tok"], "neither"),
    (["--embedding", "{emb}:two words"], "one word without spaces"),
    (["--embedding", "{emb}:photo</w>"], "already in the model's vocabulary"),
    (["--embedding", "{emb}", "--embedding", "{emb}"], "already in the model's vocabulary"),
    (["--lora", "{unfit_lora}"], "does not fit this model"),
    (["--hypernetwork", "{unfit_hn}"], "made for another model"),
])
def test_bad_personal_options_fail_with_one_line(files, tmp_path, capsys, extra, message):
    names = {k: str(v) for k, v in files.items()} | {"root": str(files["sd"].parent)}
    assert main([*_base(files, tmp_path / "x.png"), *[a.format(**names) for a in extra]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_personal_options_do_not_apply_to_other_models(capsys):
    assert main(["sample", "--model", "mixture2d", "--lora", "x.safetensors", NO]) == 2
    assert "--lora does not apply to the mixture2d" in capsys.readouterr().err
