"""CLIP tokenizer built offline from the BPE file jaxdiff ships; diffusers tokenizer folders."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from jaxdiff.models.tokenizers import (CLIP_BPE, CLIP_BPE_SHA256, clip_tokenizer_from_bpe, clip_vocab, load_tokenizer,
                                       open_clip_bpe_path, read_bpe_merges)

BPE = CLIP_BPE

# Reference ids from OpenAI CLIP's SimpleTokenizer (open_clip.tokenizer, ftfy disabled), BOS/EOS added.
PROMPTS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "An astronaut riding a horse on Mars, 4k!": [49406, 550, 18376, 6765, 320, 4558, 525, 7496, 267, 275, 330, 256, 49407],
    "it's a dog's life": [49406, 585, 568, 320, 1929, 568, 970, 49407],
    "naïve café ☃": [49406, 1097, 35689, 563, 15304, 1741, 481, 49407],
    "A  PHOTO\tof a CAT": [49406, 320, 1125, 539, 320, 2368, 49407],
}


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer_from_bpe()


def test_shipped_bpe_file_is_openai_clips():
    """The shipped merges file is byte-identical to OpenAI CLIP's (pinned hash; open_clip's copy when installed)."""
    data = CLIP_BPE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == CLIP_BPE_SHA256
    other = open_clip_bpe_path()
    if other is not None:
        assert other.read_bytes() == data


def test_tokenizers_work_without_open_clip(monkeypatch):
    """Without open_clip_torch the default tokenizer and the benchmark's are still OpenAI CLIP's (was a TypeError)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    assert open_clip_bpe_path() is None
    from benchmarks import throughput

    for t in (clip_tokenizer_from_bpe(), throughput.tokenizer()):
        assert len(t) == 49408 and t("a photo of a cat").input_ids == PROMPTS["a photo of a cat"]
    with pytest.raises(TypeError, match="nothing for the shipped one"):
        read_bpe_merges(None)


def test_vocabulary_layout():
    vocab = clip_vocab(read_bpe_merges(BPE))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 320 and vocab["<|endoftext|>"] == 49407


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_clip_ids_match_openai(tok, prompt):
    assert tok(prompt).input_ids == PROMPTS[prompt]


def test_padding_and_truncation_to_77(tok):
    enc = tok(["a photo of a cat", "word " * 100], padding="max_length", max_length=77, truncation=True)
    short, long = enc.input_ids
    assert short == PROMPTS["a photo of a cat"] + [49407] * 70
    assert enc.attention_mask[0] == [1] * 7 + [0] * 70
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407 and set(long[1:-1]) == {tok.convert_tokens_to_ids("word</w>")}


def test_load_diffusers_clip_folder(tok, tmp_path):
    """The files of an SD 1.x ``tokenizer/`` folder (vocab.json, merges.txt, configs) load offline."""
    merges = read_bpe_merges(BPE)
    (tmp_path / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    loaded = load_tokenizer(tmp_path)
    assert type(loaded).__name__ == "CLIPTokenizer" and loaded.model_max_length == 77
    for prompt, ids in PROMPTS.items():
        assert loaded(prompt).input_ids == ids


def test_load_t5_folder(tmp_path):
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁photo", -2.0), ("▁of", -2.0), ("▁cat", -3.0)]
    transformers.T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert type(loaded).__name__ == "T5Tokenizer"
    assert loaded("a photo of a cat").input_ids == [3, 4, 5, 3, 6, 1]


def test_bad_folders_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot tell"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(ValueError, match="not supported"):
        load_tokenizer(tmp_path)
