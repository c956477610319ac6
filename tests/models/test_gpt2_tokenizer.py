"""GPT-2's byte-level BPE (GLIDE's tokenizer): the shipped vocabulary is openai's byte for byte, encodings agree
with transformers' GPT2TokenizerFast and with tiktoken-style rank encoding, the pre-tokeniser with the regex
pattern, and GLIDE's lower-casing and end-token padding."""
from __future__ import annotations

import gzip
import hashlib
import random

import numpy as np
import pytest

from jaxdiff.convert.tiktoken_bpe import ranks_to_vocab, vocab_bpe
from jaxdiff.models.gpt2_tokenizer import (GPT2_DIR, GPT2_SHA256, GPT2Tokenizer, gpt2_tokenizer, pretokenize,
                                           read_gpt2_vocab)
from jaxdiff.models.tokenizers import bytes_to_unicode

PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's encoder.py
TEXTS = ["Hello world", "I'm sure they'll've DONE it's", "x' 's 'S 'LL don't", "  leading   spaces\t\ttabs\n\nnl  ",
         "1234567890 3.14159 -42 1,000,000", "naïve café Ünïcödé", "日本語のテキスト", "emoji 🐶🐕‍🦺 ok", "ØÆÅ ß ﬁ",
         "\u00a0nbsp\u2003em\u3000ideographic", "a\r\nb", "", " ", "a  ", "  \n", "‐ – — … “quotes”",
         "an oil painting of a corgi", "e\u0301 combining", "x²³ ½ Ⅻ ٣", "$%^&*()_+{}|:<>?"]


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def byte_ranks() -> dict[bytes, int]:
    """tiktoken's view of GPT-2: the bytes of every token -> its id, read from encoder.json alone."""
    decode = {c: b for b, c in bytes_to_unicode().items()}
    encoder, _ = read_gpt2_vocab()
    return {bytes(decode[c] for c in t): i for t, i in encoder.items() if t != "<|endoftext|>"}


def rank_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Reference: regex pre-tokenisation, then join the lowest-ranked adjacent byte pair until none is a token."""
    regex = pytest.importorskip("regex")
    ids = []
    for piece in regex.findall(PATTERN, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            joins = [ranks.get(parts[i] + parts[i + 1], 1 << 30) for i in range(len(parts) - 1)]
            i = int(np.argmin(joins))
            if joins[i] == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_shipped_vocabulary_is_openais(tok):
    """50,257 ids, end token 50256; uncompressed files hash to openai's published sha256."""
    for name in ("encoder.json", "vocab.bpe"):
        data = gzip.decompress((GPT2_DIR / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == GPT2_SHA256[name]
    assert tok.n_vocab == 50257 and tok.end_token == 50256 and len(tok.ranks) == 50000
    assert tok.decoder[50256] == "<|endoftext|>"


def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262] and tok.encode("\n") == [198] and tok.encode(" ") == [220]
    assert tok.encode("a,b.") == [64, 11, 65, 13] and tok.encode(",.") == [38508]  # ",." is one token


def test_pretokenize_matches_gpt2_pattern():
    """The scanner against the regex on the fixed texts and 300 random strings over tricky characters."""
    regex = pytest.importorskip("regex")
    pool = list("aZé日1٣ ½'sltdrevm!?.\t\n\r\u00a0\u2003\u3000\x1c🐶\u0301-")
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice(pool) for _ in range(rng.randint(0, 25))) for _ in range(300)]
    for text in texts:
        assert pretokenize(text) == regex.findall(PATTERN, text), repr(text)


def test_encode_agrees_with_transformers_and_ranks(tok, byte_ranks):
    """Merges-based encoding == transformers' GPT2TokenizerFast built offline from the shipped files == tiktoken-
    style rank encoding from encoder.json alone; decode inverts encode."""
    transformers = pytest.importorskip("transformers")
    encoder, merges = read_gpt2_vocab()
    hf = transformers.GPT2TokenizerFast(vocab=encoder, merges=merges)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text) == rank_encode(text, byte_ranks), repr(text)
        assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") == rank_encode("<|endoftext|>", byte_ranks)  # plain text, as GLIDE's encoder


def test_ranks_to_vocab_recovers_merges(byte_ranks):
    """A prefix of GPT-2's rank table converts back to the first merges of openai's vocab.bpe; a table that is not
    a BPE (a token no merge of lower ranks makes) is refused."""
    _, merges = read_gpt2_vocab()
    prefix = {t: r for t, r in byte_ranks.items() if r < 3000}
    encoder, recovered = ranks_to_vocab(prefix)
    assert recovered == merges[:2744] and len(encoder) == 3001 and encoder["<|endoftext|>"] == 3000
    assert vocab_bpe(recovered).startswith("#version: 0.2\nĠ t\n")
    broken = dict(prefix)
    broken[b"qqqzz"] = 3000   # "qqqzz" is no join of two tokens ranked below it
    with pytest.raises(ValueError, match="not one merge"):
        ranks_to_vocab(broken)


def test_glide_lowercase_and_padding(tok):
    """GLIDE lower-cases before encoding, truncates to text_ctx and pads with the end token (mask False)."""
    assert tok.glide_encode("A Corgi") == tok.encode("a corgi")
    ids, mask = tok.padded_tokens_and_mask(tok.glide_encode("an oil painting"), 6)
    assert ids == tok.encode("an oil painting") + [50256] * 3 and mask == [True] * 3 + [False] * 3
    assert tok.padded_tokens_and_mask([], 4) == ([50256] * 4, [False] * 4)
    assert tok.padded_tokens_and_mask(list(range(10)), 4) == ([0, 1, 2, 3], [True] * 4)


def test_bad_input(tok, tmp_path):
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode([1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([50257])
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        GPT2Tokenizer.load(tmp_path)
