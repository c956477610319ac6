"""Regenerates the GPT-2 vocabulary jaxdiff ships (``jaxdiff/assets/gpt2/``) from the ``openai-whisper`` sdist.

The sdist carries GPT-2's BPE ranks as ``whisper/assets/gpt2.tiktoken``; :mod:`jaxdiff.convert.tiktoken_bpe`
turns them into openai's ``encoder.json`` + ``vocab.bpe`` (each merge recovered from the ranks), checks them
against openai's published sha256 and writes them gzipped without time stamps, so a rerun reproduces the
shipped files byte for byte.

    pip download --no-deps openai-whisper==20250625 -d /tmp/wh
    python examples/glide/gpt2_vocab.py /tmp/wh/openai_whisper-20250625.tar.gz
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jaxdiff.convert.tiktoken_bpe import (encoder_json, ranks_to_vocab, read_tiktoken, vocab_bpe,  # noqa: E402
                                          write_vocab)
from jaxdiff.models.gpt2_tokenizer import GPT2_DIR, GPT2_SHA256, GPT2_VOCAB  # noqa: E402

MEMBER = "whisper/assets/gpt2.tiktoken"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sdist", type=Path, help="openai-whisper sdist (.tar.gz) or an extracted gpt2.tiktoken")
    ap.add_argument("--out", type=Path, default=GPT2_DIR, help="folder for encoder.json.gz + vocab.bpe.gz")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.sdist
        if path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
                if member is None:
                    raise SystemExit(f"{path} has no {MEMBER}; pass the openai-whisper sdist")
                path = Path(tmp) / "gpt2.tiktoken"
                path.write_bytes(tar.extractfile(member).read())
        encoder, merges = ranks_to_vocab(read_tiktoken(path))
    if len(encoder) != GPT2_VOCAB:
        raise SystemExit(f"{len(encoder)} tokens, expected GPT-2's {GPT2_VOCAB}")
    for name, text in (("encoder.json", encoder_json(encoder)), ("vocab.bpe", vocab_bpe(merges))):
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != GPT2_SHA256[name]:
            raise SystemExit(f"{name}: sha256 {digest} differs from openai's {GPT2_SHA256[name]}")
        print(f"{name}: {len(text.encode('utf-8')):,} bytes, sha256 {digest} (= openai's)")
    for p in write_vocab(encoder, merges, args.out):
        print(f"wrote {p} ({p.stat().st_size:,} bytes)")
    print(f"{len(encoder)} tokens, {len(merges)} merges in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
