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

# GPT-2's encoder.py pattern, for the regex module
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
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


def test_hf_file_names_load(tok, tmp_path):
    """HF's vocab.json + merges.txt (plain) hold the same tables as openai's gzipped encoder.json + vocab.bpe."""
    for src, dst in (("encoder.json.gz", "vocab.json"), ("vocab.bpe.gz", "merges.txt")):
        (tmp_path / dst).write_bytes(gzip.decompress((GPT2_DIR / src).read_bytes()))
    hf = GPT2Tokenizer.load(tmp_path)
    assert hf.encoder == tok.encoder and hf.ranks == tok.ranks


def test_bad_input(tok, tmp_path):
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode([1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([50257])
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        GPT2Tokenizer.load(tmp_path)


def test_glide_prompt_tokens_and_text_conditions(tok):
    """Pipeline prompts: text -> GLIDE's lower-cased ids padded with the mask, ids kept as given, the empty prompt
    for the unconditional half; ``text_conditions`` equals the network's encoder on those tokens, one compile for
    two prompts, and ids beyond the network's vocabulary are refused."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models._pure import PureModel
    from jaxdiff.models.glide import GlideConfig, GlideUNet
    from jaxdiff.pipelines import glide as P

    tokens, mask = P.prompt_tokens("A Corgi", 8, batch=2)
    ids = tok.encode("a corgi")
    assert tokens.shape == (2, 8) and tokens.dtype == np.int32 and (tokens[1] == ids + [50256] * (8 - len(ids))).all()
    assert (mask == (np.arange(8) < len(ids))).all()
    rows, _ = P.prompt_tokens(["a", "b c"], 4)
    assert rows.tolist() == [[64, 50256, 50256, 50256], [65, 269, 50256, 50256]]
    assert P.prompt_tokens([7, 8], 3)[0].tolist() == [[7, 8, 50256]]
    with pytest.raises(ValueError, match="batch"):
        P.prompt_tokens(["a", "b"], 4, batch=3)

    cfg = GlideConfig(image_size=8, num_channels=16, num_res_blocks=1, channel_mult=(1,), attention_resolutions=(),
                      num_head_channels=8, text_ctx=6, xf_width=8, xf_layers=1, xf_heads=1, norm_num_groups=8)
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: GlideUNet(cfg, rngs=nnx.Rngs(0))))  # random weights,
    leaves, tree = jax.tree.flatten(shapes)                                               # no eager init
    rng = np.random.default_rng(0)
    net = PureModel(state=jax.tree.unflatten(tree, [jnp.asarray(rng.standard_normal(x.shape) * 0.2, x.dtype)
                                                    for x in leaves]), graphdef=graphdef)
    P._encode_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = P._encode_jit._cache_size()
    text, uncond = P.text_conditions(net, "A Corgi", 2)
    P.text_conditions(net, "an oil painting of a dog", 2)
    assert P._encode_jit._cache_size() == before + 1
    want = P._encode_jit(net, *map(jnp.asarray, P.prompt_tokens(tok.encode("a corgi"), 6, 2)))
    np.testing.assert_array_equal(np.asarray(text["text_states"]), np.asarray(want["text_states"]))
    empty = P._encode_jit(net, jnp.full((2, 6), 50256, jnp.int32), jnp.zeros((2, 6), bool))
    np.testing.assert_array_equal(np.asarray(uncond["text_proj"]), np.asarray(empty["text_proj"]))
    assert not np.allclose(np.asarray(text["text_proj"]), np.asarray(empty["text_proj"]))
    with pytest.raises(ValueError, match="n_vocab=50257"):
        P.text_conditions(net, [50300])
