"""Textual inversion: the shared file formats, tokens and table rows, errors, and training only the new rows."""
from __future__ import annotations

import base64
import json

import jax
import numpy as np
import pytest

from jaxdiff import textual_inversion as ti
from jaxdiff.convert.export import write_safetensors
from tests.pipelines import _tiny_sd

WIDTH = 8  # the tiny model's text width
VECTORS = np.random.default_rng(0).standard_normal((3, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _tiny_sd.build(tmp_path_factory.mktemp("ti_tok"))


def _a1111_png(path, data: dict) -> None:
    """An AUTOMATIC1111 embedding image, built from the format's description: the .pt dict as JSON with each
    tensor as {"TORCHTENSOR": nested lists}, base64-encoded, in the 'sd-ti-embedding' tEXt chunk."""
    from PIL import Image, PngImagePlugin

    def enc(v):
        return {"TORCHTENSOR": v.tolist()} if isinstance(v, np.ndarray) else v

    blob = {k: ({kk: enc(vv) for kk, vv in v.items()} if isinstance(v, dict) else enc(v)) for k, v in data.items()}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(blob).encode()).decode())
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)


def test_every_format_reads_the_same_vectors(tmp_path):
    torch = pytest.importorskip("torch")
    a1111 = {"string_to_token": {"*": 265}, "name": "inner-name", "step": 30, "sd_checkpoint": "abc",
             "sd_checkpoint_name": "v1"}
    files = {}
    files["diffusers"] = write_safetensors(tmp_path / "learned_embeds.safetensors", {"<cat>": VECTORS})
    files["a1111_st"] = write_safetensors(tmp_path / "stylish.safetensors", {"emb_params": VECTORS})
    files["a1111_pt"] = tmp_path / "stylish.pt"
    torch.save({**a1111, "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(VECTORS))}}, files["a1111_pt"])
    files["diffusers_bin"] = tmp_path / "learned_embeds.bin"
    torch.save({"<cat>": torch.from_numpy(VECTORS)}, files["diffusers_bin"])
    files["png"] = tmp_path / "preview.png"
    _a1111_png(files["png"], {**a1111, "string_to_param": {"*": VECTORS}})
    tokens = {"diffusers": "<cat>", "a1111_st": "stylish", "a1111_pt": "stylish", "diffusers_bin": "<cat>",
              "png": "inner-name"}
    for kind, path in files.items():
        emb = ti.read_embedding(path)
        np.testing.assert_array_equal(emb.vectors, VECTORS, err_msg=kind)
        assert emb.token == tokens[kind], kind
        assert emb.tokens == [emb.token, emb.token + "_1", emb.token + "_2"]
    assert ti.read_embedding(tmp_path).token == "<cat>"  # a folder with learned_embeds.safetensors
    assert ti.read_embedding(files["a1111_pt"], token="<s>").token == "<s>"
    single = ti.read_embedding(write_safetensors(tmp_path / "one.safetensors", {"<d>": VECTORS[0]}))
    assert single.vectors.shape == (1, WIDTH)


def test_sdxl_width_and_existing_tokens_are_clear_errors(sd, tmp_path):
    xl = write_safetensors(tmp_path / "xl.safetensors", {"clip_l": VECTORS, "clip_g": np.zeros((3, 16), np.float32)})
    with pytest.raises(ti.EmbeddingFormatError, match="SDXL"):
        ti.load_textual_inversion(sd, xl)
    wide = write_safetensors(tmp_path / "wide.safetensors", {"<w>": np.zeros((1, 12), np.float32)})
    with pytest.raises(ti.EmbeddingFormatError, match="width 12.*8 wide"):
        ti.load_textual_inversion(sd, wide)
    emb = write_safetensors(tmp_path / "e.safetensors", {"<e>": VECTORS})
    with pytest.raises(ValueError, match="already in the tokenizer"):
        ti.load_textual_inversion(sd, emb, token="a</w>")
    loaded = ti.load_textual_inversion(sd, emb)
    with pytest.raises(ValueError, match="'<e>' is already"):
        ti.load_textual_inversion(loaded, emb)
    with pytest.raises(ti.EmbeddingFormatError, match="found keys"):
        ti.read_embedding(write_safetensors(tmp_path / "two.safetensors", {"x": VECTORS, "y": VECTORS}))


def _text_leaves(model):
    return jax.tree_util.tree_leaves(model.state)


def test_tokens_expand_rows_land_and_shapes_stay(sd, tmp_path):
    """A 3-vector token expands to its three ids in the prompt (diffusers' names and order), each id embeds its
    vector, and loading a second embedding changes no shape of the model (the compiled program stays valid)."""
    emb = write_safetensors(tmp_path / "e.safetensors", {"<e>": VECTORS})
    one = ti.load_textual_inversion(sd, emb)
    base = len(sd.tokenizer)
    ids = one.tokenize(["a <e> b"])[0]
    assert list(ids[:6]) == [0, 2, base, base + 1, base + 2, 3]
    np.testing.assert_array_equal(ti.get_embedding(one, "<e>").vectors, VECTORS)
    assert "<e>" not in sd.tokenizer.get_vocab() and len(sd.tokenizer) == base  # the original is unchanged
    rows, width = ti.table_shape(one.models.text_encoder)
    assert width == WIDTH and rows % ti.SPARE_ROWS == 0 and rows >= base + 3 + ti.SPARE_ROWS
    # the prompt's text states equal those of a prompt spelling out the three tokens
    spelled = one.tokenizer.inner(["a <e> <e>_1 <e>_2 b"], padding="max_length", max_length=one.max_length,
                                  return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, spelled[0])
    two = ti.load_textual_inversion(one, write_safetensors(tmp_path / "f.safetensors", {"<f>": VECTORS[:1] * 2}))
    shapes = [(a.shape, a.dtype) for a in _text_leaves(two.models.text_encoder)]
    assert shapes == [(a.shape, a.dtype) for a in _text_leaves(one.models.text_encoder)]
    assert two.tokenize(["<f> a"])[0][1] == base + 3
    np.testing.assert_array_equal(ti.get_embedding(two, "<f>").vectors, VECTORS[:1] * 2)
    np.testing.assert_array_equal(ti.get_embedding(two, "<e>").vectors, VECTORS)
    reserved = ti.reserve_tokens(sd, 100)  # padded up front: even the first embedding changes no shape
    assert ti.table_shape(reserved.models.text_encoder)[0] == base + 100
    first = ti.load_textual_inversion(reserved, emb)
    assert [a.shape for a in _text_leaves(first.models.text_encoder)] == \
        [a.shape for a in _text_leaves(reserved.models.text_encoder)]
    np.testing.assert_array_equal(np.asarray(first.encode_prompt(["a <e> b"])),
                                  np.asarray(one.encode_prompt(["a <e> b"])))  # the capacity changes nothing


def test_training_changes_only_the_new_rows(sd, tmp_path):
    latents = np.random.default_rng(1).standard_normal((4, 4, 4, 4)).astype(np.float32)
    prompts = ["a <t>", "<t> b", "c <t>", "<t>"]
    out, emb, losses = ti.train_embedding(sd, "<t>", None, prompts, num_vectors=2, init_word="a", steps=2,
                                          learning_rate=0.05, batch_size=2, seed=0, latents=latents)
    assert losses.shape == (2,) and np.all(np.isfinite(losses))
    for name in ("unet", "vae"):  # the networks are the same arrays, bit for bit
        for a, b in zip(jax.tree_util.tree_leaves(getattr(out.models, name).state),
                        jax.tree_util.tree_leaves(getattr(sd.models, name).state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = ti.token_ids(out, "<t>")
    base = len(sd.tokenizer)
    assert ids == [base, base + 1]
    name = ti.patches._resolve(out.models.text_encoder.state, ti.TABLE)
    after = np.asarray(ti.patches._params(out.models.text_encoder.state)[name])
    before = np.asarray(ti.patches._params(sd.models.text_encoder.state)[name])
    np.testing.assert_array_equal(after[:base], before)  # every original row, bit for bit
    np.testing.assert_array_equal(after[base + 2:], 0.0)  # the spare rows are still empty padding
    start = before[sd.tokenizer.convert_tokens_to_ids("a</w>")]
    assert np.abs(after[ids] - start).max() > 1e-4  # the new rows moved from their start (the word "a")
    np.testing.assert_array_equal(after[ids], emb.vectors)
    others_out = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(out.models.text_encoder.state)
                  if "token_embedding" not in jax.tree_util.keystr(k)]
    others_in = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(sd.models.text_encoder.state)
                 if "token_embedding" not in jax.tree_util.keystr(k)]
    assert len(others_out) == len(others_in) > 5
    for a, b in zip(others_out, others_in):
        np.testing.assert_array_equal(a, b)
    # saved in diffusers' format and loaded back: the same text states as the trained model
    path = ti.save_embedding(tmp_path / "t.safetensors", emb)
    again = ti.load_textual_inversion(sd, path)
    np.testing.assert_array_equal(np.asarray(again.encode_prompt(prompts)), np.asarray(out.encode_prompt(prompts)))


def test_encode_and_decode_latents_are_the_pipelines_autoencoder_in_any_batching(sd):
    import jax.numpy as jnp

    images = np.random.default_rng(1).random((5, 16, 16, 3)).astype(np.float32)
    m = sd.models
    direct = np.asarray(m.decode(m.to_latent(m.encode_image(jnp.asarray(images * 2 - 1))[0])))
    latents = ti.encode_images(sd, images, batch=2)  # batches of 2, 2 and 1
    np.testing.assert_allclose(ti.decode_latents(sd, latents, batch=3), direct, atol=1e-5)
    np.testing.assert_allclose(ti.decode_latents(sd, latents), ti.decode_latents(sd, latents, batch=3), atol=1e-6)
