"""examples/digits_sd/train_clip.py at a microscopic size: its tokenizer splits like CLIP's, it trains, and the
folder it writes loads back in jaxdiff and transformers with the trained model's features."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.folders import load_model_folder
from jaxdiff.data.digits_text import COLOUR_PAIRS, COLOURS, SLANTS, THICKNESSES, alpha_maps, caption, composite
from jaxdiff.models.clip import CLIPModel
from jaxdiff.models.tokenizers import clip_tokenizer_from_bpe
from tests._examples import load_script


def _script():
    return load_script("examples/digits_sd/train_clip.py", "digits_clip_train")


def _mini_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` captioned colour digits in ``load_digits_text``'s format, built directly (no 8 s full load)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(digits.target), n, replace=False)
    pairs = np.array([COLOUR_PAIRS[k] for k in rng.integers(len(COLOUR_PAIRS), size=n)])
    labels = digits.target[idx].astype(np.int32)
    thickness, slant = rng.integers(3, size=n).astype(np.int32), rng.integers(3, size=n).astype(np.int32)
    caps = [caption(int(y), COLOURS[i], COLOURS[b], THICKNESSES[t], SLANTS[s], rng)
            for y, (i, b), t, s in zip(labels, pairs, thickness, slant)]
    return {"image": composite(alpha_maps(digits.images[idx] / 16.0), pairs[:, 0], pairs[:, 1]), "label": labels,
            "ink": pairs[:, 0].astype(np.int32), "background": pairs[:, 1].astype(np.int32), "caption": np.array(caps),
            "thickness": thickness, "slant": slant}


MICRO = {"max_length": 24,
         "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
         "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "patch_size": 8},
         "projection_dim": 8, "steps": 4, "batch_size": 16,
         "optimizer": {"learning_rate": 1e-3, "warmup_steps": 1}}


def test_restricted_tokenizer_splits_like_clip_and_never_loses_text():
    ex = _script()
    texts = ["a thick red seven on a white background", "the digit 4, drawn in blue on yellow, slanted to the left"]
    tok = ex.restricted_tokenizer(ex.caption_vocabulary_texts(texts), max_length=24)
    full = clip_tokenizer_from_bpe()
    for text in texts + ex.prompts()["photo"] + ex.prompts()["own"]:
        assert tok.tokenize(text) == full.tokenize(text)  # the full OpenAI vocabulary is the reference
    assert len(tok.get_vocab()) < 1000 and tok.eos_token_id == len(tok.get_vocab()) - 1
    unseen = "zebra crossing"  # words never kept: split into smaller real CLIP pieces, nothing unknown
    ids = ex.tokenize(tok, [unseen], 24)[0]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True).strip() == unseen
    assert len(tok.tokenize(unseen)) > len(full.tokenize(unseen))
    caps, labels = np.array(["a red 3 on a white background"] * 400), np.arange(400) % 10
    assert (ex.short_captions(caps, labels, 0.0, 0) == caps).all()
    short = ex.short_captions(caps, labels, 0.25, 0)
    changed = np.flatnonzero(short != caps)
    assert 60 < len(changed) < 140  # about a quarter
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert all(short[i].split()[-1] in (str(labels[i]), words[labels[i]]) for i in changed)
    assert ex.merges_used("photo</w>", {("p", "h"): 0, ("ph", "o"): 1, ("t", "o</w>"): 2, ("pho", "to</w>"): 3}) == [
        ("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>")]


def test_micro_run_trains_evaluates_and_saves_a_folder_both_libraries_load(tmp_path):
    ex = _script()
    train_set, held = _mini_split(48, 0), _mini_split(20, 1)
    cfg = {**ex.load_config(), **MICRO}
    tok = ex.restricted_tokenizer(ex.caption_vocabulary_texts(list(train_set["caption"]) + list(held["caption"])),
                                  cfg["max_length"])
    model, record = ex.train(cfg, train_set, tok, progress=False)
    assert record["steps"] == 4 and np.isfinite(record["final_loss"])
    metrics = ex.evaluate(model, tok, held, cfg["max_length"])
    for key in ("clip_zero_shot_digit_accuracy", "clip_zero_shot_digit_accuracy_own_wording",
                "image_to_caption_retrieval_accuracy", "image_to_caption_content_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    ex.save(model, tok, tmp_path, {"metrics": metrics})

    back = load_model_folder(tmp_path)
    assert isinstance(back, CLIPModel) and back.config == model.config
    ids = ex.tokenize(tok, list(held["caption"][:5]) + ex.prompts()["photo"][:3], cfg["max_length"])
    pixels = ex.to_pixels(held["image"][:6])
    for name, arg in (("get_text_features", ids), ("get_image_features", pixels)):
        np.testing.assert_array_equal(getattr(back, name)(jnp.asarray(arg)), getattr(model, name)(jnp.asarray(arg)))
    assert ex.evaluate(back, tok, held, cfg["max_length"]) == metrics
    assert json.loads((tmp_path / "training.json").read_text())["metrics"] == metrics

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    ref_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = list(held["caption"][:5]) + ex.prompts()["photo"][:3]
    want_ids = ref_tok(texts, padding="max_length", max_length=cfg["max_length"], truncation=True).input_ids
    np.testing.assert_array_equal(np.asarray(want_ids), ids)
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    u8 = np.round(held["image"][:6] * 255).astype(np.uint8)
    px = processor(images=list(u8), return_tensors="pt").pixel_values  # (N, 3, 32, 32)
    np.testing.assert_allclose(px.numpy().transpose(0, 2, 3, 1), ex.to_pixels(u8 / 255.0), atol=1e-6)
    with torch.no_grad():
        t = ref.eval().get_text_features(torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
        v = ref.get_image_features(px).pooler_output.numpy()
    np.testing.assert_allclose(t, np.asarray(model.get_text_features(jnp.asarray(ids))), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v, np.asarray(model.get_image_features(jnp.asarray(ex.to_pixels(u8 / 255.0)))),
                               atol=1e-5, rtol=1e-5)


def test_caption_attributes_name_what_the_image_shows_and_nothing_more():
    """Every training caption (full or digit-only) describes its own image; a digit-only caption names the digit
    alone, so it also describes every other image of that digit (the multi-positive targets)."""
    ex = _script()
    split = _mini_split(60, 3)
    captions = ex.short_captions(split["caption"], split["label"], 0.5, 0)
    text, image = ex.caption_attributes(captions), ex.image_attributes(split)
    assert text.shape == image.shape == (60, 5)
    assert np.all((text < 0) | (text == image))  # each caption fits its image
    short = captions != split["caption"]
    assert short.any() and (~short).any()
    np.testing.assert_array_equal(text[short, 0], split["label"][short])
    assert (text[short, 1:] == -1).all() and (text[~short, 1:3] >= 0).all()  # full captions always name colours
    assert ex.caption_attributes(np.array(["number 7", "the digit seven", "handwritten 0"]))[:, 0].tolist() == [7, 7, 0]


def test_shifted_grouped_batches():
    ex = _script()
    img = np.zeros((2, 6, 6, 1), np.float32)
    img[:, 2, 3] = 1.0
    img[:, 0, :] = 0.5  # the top row is the edge replicated into the gap
    out = ex.shift_images(img, np.array([[1, -2], [0, 0]]))
    assert out[0, 3, 1, 0] == 1.0 and out[0].sum() == 1.0 + 0.5 * 6 * 2  # moved down 1, left 2; top row doubled
    np.testing.assert_array_equal(out[1], img[1])
    split = _mini_split(64, 4)
    split["ink"], split["background"] = np.repeat([0, 1, 2, 3], 16), np.repeat([1, 0, 0, 0], 16)  # 4 pairs x 16
    cfg = {**ex.load_config(), "batch_size": 16, "colour_pairs_per_batch": 2, "max_shift": 2}
    arrays = {"x": ex.to_pixels(split["image"]), "pair": split["ink"] * 8 + split["background"]}
    source = ex.batches(cfg, arrays, split)
    b = source.batch(3)
    assert len(np.unique(b["pair"])) == 2 and b["x"].shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(b["x"], source.batch(3)["x"])
    assert source.identity()["max_shift"] == 2 and source.batch_size == 16
