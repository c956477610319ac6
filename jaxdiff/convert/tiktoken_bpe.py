"""A tiktoken BPE ranks file -> GPT-2's ``encoder.json`` + ``vocab.bpe`` (Radford et al. 2019's byte-level BPE).

A ``.tiktoken`` file lists every token as ``base64(bytes) rank``; GPT-2's files list the tokens as
byte-to-unicode strings with ids (``encoder.json``) and the merges in order (``vocab.bpe``). The ranks are
GPT-2's ids (256 single bytes, then one token per merge), and a token's merge is recovered from the ranks alone:
byte-pair encoding the token's bytes with only the ranks below its own ends in exactly two parts, the pair the
merge joined. The conversion is deterministic (ids ascending, fixed gzip header), so the files it writes are
reproducible byte for byte.
"""
from __future__ import annotations

import base64
import gzip
import io
import json
import os
import pathlib

from jaxdiff.models.tokenizers import bytes_to_unicode

END_OF_TEXT = "<|endoftext|>"
VERSION_LINE = "#version: 0.2"


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """The ``bytes -> rank`` table of a ``.tiktoken`` file (one ``base64 rank`` pair a line)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(pathlib.Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line!r}; is this a .tiktoken file?")
        ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def _split_below(token: str, ranks: dict[str, int], limit: int) -> list[str]:
    """Byte-pair encoding of ``token`` (byte-unicode characters) using only ranks below ``limit``: repeatedly
    join the adjacent pair whose join has the lowest rank."""
    parts = list(token)
    while len(parts) > 1:
        best, where = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], limit)
            if r < best:
                best, where = r, i
        if where < 0:
            break
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
    return parts


def ranks_to_vocab(ranks: dict[bytes, int],
                   end_token: str | None = END_OF_TEXT) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(encoder, merges)`` of a rank table: ``encoder`` maps byte-unicode token strings to their ranks (plus
    ``end_token`` with the next id, as GPT-2's ``encoder.json``), ``merges[i]`` is the pair that made the token of
    rank ``256 + i``. Raises if the ranks are not a byte-level BPE (missing bytes, gaps, or a token whose bytes
    do not BPE-encode to two parts below its rank)."""
    table = bytes_to_unicode()
    order = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in order] != list(range(len(order))):
        raise ValueError("ranks must be 0 .. N-1 without gaps or repeats")
    singles = [t for t, _ in order[:256]]
    if sorted(singles) != [bytes([b]) for b in range(256)]:
        raise ValueError("the first 256 ranks must be the 256 single bytes (a byte-level BPE)")
    strings = {"".join(table[b] for b in t): r for t, r in order}
    merges: list[tuple[str, str]] = []
    for token, rank in list(strings.items())[256:]:
        parts = _split_below(token, strings, rank)
        if len(parts) != 2:
            raise ValueError(f"token of rank {rank} ({token!r}) is not one merge of lower-ranked tokens "
                             f"(BPE below its rank gives {parts}); the file is not a BPE rank table")
        merges.append((parts[0], parts[1]))
    encoder = dict(strings)
    if end_token is not None:
        encoder[end_token] = len(encoder)
    return encoder, merges


def encoder_json(encoder: dict[str, int]) -> str:
    """``encoder.json`` text as openai writes it (``json.dumps``: ASCII escapes, ids ascending)."""
    return json.dumps(dict(sorted(encoder.items(), key=lambda kv: kv[1])))


def vocab_bpe(merges: list[tuple[str, str]]) -> str:
    """``vocab.bpe`` text: the version line, then one ``left right`` merge a line."""
    return "".join(f"{line}\n" for line in [VERSION_LINE, *(f"{a} {b}" for a, b in merges)])


def _write(path: pathlib.Path, text: str) -> None:
    data = text.encode("utf-8")
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
            f.write(data)
        data = buf.getvalue()
    path.write_bytes(data)


def write_vocab(encoder: dict[str, int], merges: list[tuple[str, str]], folder: str | os.PathLike,
                gz: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``encoder.json(.gz)`` and ``vocab.bpe(.gz)`` into ``folder`` (gzip without name or time stamp)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    paths = folder / f"encoder.json{ext}", folder / f"vocab.bpe{ext}"
    _write(paths[0], encoder_json(encoder))
    _write(paths[1], vocab_bpe(merges))
    return paths


def convert_tiktoken(path: str | os.PathLike, folder: str | os.PathLike,
                     gz: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """``.tiktoken`` ranks file -> ``encoder.json(.gz)`` + ``vocab.bpe(.gz)`` in ``folder``."""
    encoder, merges = ranks_to_vocab(read_tiktoken(path))
    return write_vocab(encoder, merges, folder, gz)
