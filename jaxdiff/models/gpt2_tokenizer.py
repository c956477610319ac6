"""GPT-2's byte-level BPE tokenizer (Radford et al. 2019), the text tokenizer of GLIDE (Nichol et al. 2022).

Pure Python, offline, no dependency: text is split by GPT-2's pre-tokenisation pattern
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`` (implemented as a scanner over
Unicode categories, :func:`pretokenize`), each piece's UTF-8 bytes are mapped to printable characters
(:func:`jaxdiff.models.tokenizers.bytes_to_unicode`) and merged pair by pair in ``vocab.bpe`` order, lowest
rank first; ``encoder.json`` gives the ids. Letters, numbers and whitespace are Python's ``unicodedata`` classes
(``\\s`` = Unicode White_Space); they equal the ``regex`` module's on every code point assigned in Python's
Unicode database (14.0 for Python 3.11), later-assigned characters count as symbols here.

jaxdiff ships GPT-2's vocabulary (50,257 ids, ``<|endoftext|>`` = 50256), converted from the BPE ranks in the
``openai-whisper`` package (:mod:`jaxdiff.convert.tiktoken_bpe`; byte-identical to openai's ``encoder.json`` /
``vocab.bpe``, see :data:`GPT2_SHA256`); HF's ``vocab.json`` + ``merges.txt`` hold the same tables and load too.

GLIDE (glide-text2im's ``tokenizer/bpe.py``) lower-cases the text before encoding and pads to ``text_ctx``
with the end token: :meth:`GPT2Tokenizer.glide_encode`, :meth:`GPT2Tokenizer.padded_tokens_and_mask`.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import unicodedata
from typing import Sequence

from jaxdiff.models.tokenizers import bytes_to_unicode

GPT2_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "gpt2"
"""GPT-2's ``encoder.json.gz`` + ``vocab.bpe.gz`` as jaxdiff ships them (MIT license, from openai-whisper)."""
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
"""sha256 of openai's uncompressed GPT-2 files (as tiktoken pins them; HF ``gpt2``'s vocab.json / merges.txt
are the same files)."""
GPT2_VOCAB = 50257
END_OF_TEXT = "<|endoftext|>"
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
_NOT_WHITE = "\x1c\x1d\x1e\x1f"  # str.isspace() but not Unicode White_Space (the pattern's \s)


# ---- pre-tokenisation ------------------------------------------------------------------------

def _kind(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'O' anything else (GPT-2's \\p{L}, \\p{N}, \\s classes)."""
    if ch.isspace() and ch not in _NOT_WHITE:
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "O"


def pretokenize(text: str) -> list[str]:
    """GPT-2's pre-tokenisation: the matches of its pattern, in order (they cover the whole text). Alternatives in
    the pattern's order: a contraction; an optional space + letters; + numbers; + other symbols; a whitespace run
    not followed by a non-space (its last character is left for the next piece when one follows); whitespace."""
    kinds = [_kind(c) for c in text]
    n, i, out = len(text), 0, []

    def run(j: int, kind: str) -> int:
        while j < n and kinds[j] == kind:
            j += 1
        return j

    while i < n:
        if text[i] == "'":
            c = next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)
            if c is not None:
                out.append(text[i : i + 1 + len(c)])
                i += 1 + len(c)
                continue
        start = i + 1 if text[i] == " " and i + 1 < n and kinds[i + 1] != "S" else i
        if kinds[start] != "S":                       # ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
            j = run(start, kinds[start])
        else:                                         # '\s+(?!\S)', then '\s+'
            j = run(i, "S")
            if j < n and j - i > 1:
                j -= 1
        out.append(text[i:j])
        i = j
    return out


# ---- vocabulary files ------------------------------------------------------------------------

def _read_text(path: pathlib.Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist; omit the folder to use the GPT-2 "
                                f"vocabulary jaxdiff ships ({GPT2_DIR})")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _find(folder: pathlib.Path, names: Sequence[str]) -> pathlib.Path:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{folder} holds none of {', '.join(names)} (plain or .gz); a GPT-2 vocabulary folder "
                            "has encoder.json + vocab.bpe (openai) or vocab.json + merges.txt (Hugging Face)")


def read_gpt2_vocab(folder: str | os.PathLike = GPT2_DIR) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(encoder, merges)`` of a GPT-2 vocabulary folder: openai's ``encoder.json`` + ``vocab.bpe`` or HF's
    ``vocab.json`` + ``merges.txt``, each plain or gzipped (``.gz``)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"GPT-2 vocabulary folder {folder} does not exist; omit it to use the one jaxdiff "
                                f"ships ({GPT2_DIR})")
    encoder = json.loads(_read_text(_find(folder, ("encoder.json", "vocab.json"))))
    merges_path = _find(folder, ("vocab.bpe", "merges.txt"))
    lines = [line for line in _read_text(merges_path).split("\n") if line and not line.startswith("#version")]
    merges = [tuple(line.split(" ")) for line in lines]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{merges_path}: {len(bad)} lines are not 'left right' merges (first: {bad[0]!r})")
    return encoder, merges  # type: ignore[return-value]


# ---- the tokenizer ---------------------------------------------------------------------------

class GPT2Tokenizer:
    """GPT-2's byte-level BPE: ``encode`` (text -> ids), ``decode`` (ids -> text), GLIDE's lower-cased encoding and
    end-token padding. A plain Python object (not a pytree): tokenisation happens before any traced code."""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]):
        self.encoder = dict(encoder)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [m for m in self.ranks if "".join(m) not in self.encoder]
        if missing:
            raise ValueError(f"{len(missing)} merges make tokens missing from the encoder (first {missing[0]!r}); "
                             "the encoder and merges files do not belong together")
        self._cache: dict[str, tuple[str, ...]] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike = GPT2_DIR) -> "GPT2Tokenizer":
        """From a vocabulary folder (:func:`read_gpt2_vocab`); default: GPT-2's, shipped with jaxdiff."""
        return cls(*read_gpt2_vocab(folder))

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    @property
    def end_token(self) -> int:
        """``<|endoftext|>``, the last id (GLIDE pads with it)."""
        return self.encoder.get(END_OF_TEXT, self.n_vocab - 1)

    def bpe(self, piece: str) -> tuple[str, ...]:
        """Merges a byte-unicode piece: the adjacent pair with the lowest merge rank joins (every occurrence,
        left to right), until no pair is a merge."""
        if piece in self._cache:
            return self._cache[piece]
        word = tuple(piece)
        while len(word) > 1:
            pairs = {(word[k], word[k + 1]) for k in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            joined, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and (word[k], word[k + 1]) == best:
                    joined.append(word[k] + word[k + 1])
                    k += 2
                else:
                    joined.append(word[k])
                    k += 1
            word = tuple(joined)
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """GPT-2's ids of ``text`` (no special tokens; ``<|endoftext|>`` in the text is encoded as plain text)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; pass token ids to pad_tokens instead")
        ids: list[int] = []
        for piece in pretokenize(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (invalid UTF-8 from a partial sequence becomes U+FFFD)."""
        bad = [int(i) for i in ids if int(i) not in self.decoder]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary (0 .. {self.n_vocab - 1})")
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    def glide_encode(self, text: str) -> list[int]:
        """GLIDE's ``encode``: the text lower-cased, then GPT-2's ids."""
        return self.encode(text.lower())

    def padded_tokens_and_mask(self, ids: Sequence[int], text_ctx: int) -> tuple[list[int], list[bool]]:
        """glide-text2im's padding: the first ``text_ctx`` ids, then the end token; the mask is True on the ids."""
        ids = [int(i) for i in ids][:text_ctx]
        pad = text_ctx - len(ids)
        return ids + [self.end_token] * pad, [True] * len(ids) + [False] * pad


_SHIPPED: GPT2Tokenizer | None = None


def gpt2_tokenizer() -> GPT2Tokenizer:
    """GPT-2's tokenizer from the vocabulary jaxdiff ships, loaded once."""
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = GPT2Tokenizer.load()
    return _SHIPPED
