"""Text tokenizers for the text encoders: CLIP's byte-level BPE and T5's SentencePiece, via transformers.

Weights-free and offline: :func:`clip_tokenizer_from_bpe` builds OpenAI CLIP's tokenizer (49408
ids: 512 byte symbols, 48894 merges, ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407) from the
``bpe_simple_vocab_16e6.txt.gz`` merges file of OpenAI's CLIP, which jaxdiff ships (MIT license,
1.3 MB, ``jaxdiff/assets/clip/``; :data:`CLIP_BPE`), so nothing else needs installing;
:func:`load_tokenizer` opens a diffusers pipeline's ``tokenizer/`` folder without network access.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
from typing import Any

CLIP_BPE = pathlib.Path(__file__).resolve().parents[1] / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
"""OpenAI CLIP's BPE merges file, shipped with jaxdiff (the default of :func:`clip_tokenizer_from_bpe`)."""
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48894 merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in CLIP's vocabulary order: the printable
    Latin-1 bytes (mapped to themselves) first, then the other 68 bytes (mapped to 256, 257, ...)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def read_bpe_merges(path: str | os.PathLike = CLIP_BPE) -> list[tuple[str, str]]:
    """The merge rules of a ``bpe_simple_vocab_16e6.txt(.gz)`` file (first line is a header)."""
    if path is None:
        raise TypeError("path is None: pass a bpe_simple_vocab_16e6.txt.gz file, or nothing for the shipped one "
                        "(jaxdiff.models.tokenizers.CLIP_BPE)")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"BPE merges file {path} does not exist; omit the path to use the one jaxdiff ships")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [m for m in merges if len(m) != 2]
    if bad or len(merges) != NUM_MERGES:
        raise ValueError(f"{path} is not CLIP's BPE merges file ({len(merges)} merges, {len(bad)} malformed lines).")
    return merges  # type: ignore[return-value]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Ids as OpenAI CLIP assigns them: bytes, bytes + ``</w>``, one per merge, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def clip_tokenizer_from_bpe(path: str | os.PathLike = CLIP_BPE, model_max_length: int = 77) -> Any:
    """A ``transformers.CLIPTokenizer`` (OpenAI CLIP ids; padding with EOS as SD 1.x) built offline from the
    BPE merges file (default: the one jaxdiff ships). transformers 5 ignores ``vocab_file=``/``merges_file=`` here, so the vocab dict and
    merge tuples are passed directly."""
    from transformers import CLIPTokenizer

    merges = read_bpe_merges(path)
    return CLIPTokenizer(vocab=clip_vocab(merges), merges=merges, model_max_length=model_max_length)


def open_clip_bpe_path() -> pathlib.Path | None:
    """Where ``open_clip_torch`` keeps ``bpe_simple_vocab_16e6.txt.gz`` (found without importing it), or None.

    jaxdiff does not need it (it ships the same file, :data:`CLIP_BPE`); this is a plain lookup, kept for
    comparing the two."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path
    return None


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer of a diffusers ``tokenizer/`` (or ``tokenizer_2/``) folder: ``CLIPTokenizer`` from
    ``vocab.json`` + ``merges.txt``, ``T5Tokenizer`` from ``spiece.model`` / ``tokenizer.json``; never downloads."""
    import transformers

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; pass the pipeline's tokenizer/ folder.")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    name = config.get("tokenizer_class") or _guess_class(folder)
    name = name.removesuffix("Fast")
    if name not in ("CLIPTokenizer", "T5Tokenizer"):
        raise ValueError(f"{folder}: tokenizer_class {name!r} is not supported; expected CLIPTokenizer or T5Tokenizer.")
    return getattr(transformers, name).from_pretrained(str(folder), local_files_only=True)


def _guess_class(folder: pathlib.Path) -> str:
    if (folder / "merges.txt").exists():
        return "CLIPTokenizer"
    if (folder / "spiece.model").exists():
        return "T5Tokenizer"
    raise ValueError(
        f"{folder}: cannot tell the tokenizer type (no tokenizer_config.json, merges.txt or spiece.model)."
    )
