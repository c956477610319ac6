"""Train digits-clip: tiny CLIP text and vision towers, contrastively, on jaxdiff's captioned colour digits.

    python examples/digits_sd/train_clip.py --out /tmp/digits-clip [--steps N] [--json PATH]

The recipe is ``configs/clip.json``. Training uses multi-positive targets (a caption is the pair of every image
in the batch it describes: "number 7" of every 7; UniCL, Yang et al. 2022) and images shifted by up to
``max_shift`` pixels. Captions are tokenized with OpenAI CLIP's byte-level BPE (the merges
file jaxdiff ships), restricted to the symbols these captions use: the 512 byte symbols, every merge the
captions and the evaluation prompts need, BOS and EOS. On those texts the restricted tokenizer splits words
exactly as the full one does (checked at run time), and any other text still tokenizes (into smaller
pieces, never an unknown token), while the embedding table stays a few hundred rows instead of 49,408.

``--out`` receives a transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``) with its
tokenizer (``tokenizer.json``, ``vocab.json``, ``merges.txt``), an image processor config (pixels scaled
to [-1, 1], no resizing) and ``training.json`` (recipe, time, metrics). Evaluation is on the held-out split
(the digits-eval judge's 297 held-out digits, never trained on): zero-shot digit accuracy with the prompts
"a photo of the digit k" and with the data set's own wording "the digit seven", and image -> caption
retrieval.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.export import save_pretrained
from jaxdiff.data import load_digits_text, parse_caption
from jaxdiff.data.digits_text import (COLOURS, DIGIT_WORDS, SLANT_ADJECTIVES, SLANT_PHRASES, SLANTS, THICKNESS_WORDS,
                                     THICKNESSES)
from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from jaxdiff.models.tokenizers import clip_tokenizer_from_bpe, clip_vocab, read_bpe_merges
from jaxdiff.train import ArrayDataset, OptimizerConfig, fit
from jaxdiff.train.contrastive import ContrastiveObjective, ContrastiveTrainer
from jaxdiff.train.data import GroupedBatches

CONFIG = Path(__file__).resolve().parent / "configs" / "clip.json"
PHOTO_PROMPT = "a photo of the digit {k}"  # issue 11's zero-shot prompt, k = 0..9
OWN_PROMPT = "the digit {word}"  # the data set's own wording ("the digit seven, drawn in ...")
SHORT_CAPTIONS = ("the digit {d}", "number {d}", "handwritten {d}", "the number {d}", "digit {d}")
"""Digit-only wordings that replace a fraction of training captions (``short_caption_fraction``): web captions
often name the object and nothing else, and without them the towers learn that every caption names colours."""


def load_config(path: str | os.PathLike = CONFIG, **overrides: Any) -> dict[str, Any]:
    """The recipe ``configs/clip.json`` with top-level keys replaced by ``overrides``."""
    cfg = json.loads(Path(path).read_text())
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; valid: {sorted(k for k in cfg if k[0] != '_')}")
    return {**cfg, **overrides}


def prompts() -> dict[str, list[str]]:
    """The zero-shot class prompts, one per digit 0..9, in both wordings."""
    return {"photo": [PHOTO_PROMPT.format(k=k) for k in range(10)],
            "own": [OWN_PROMPT.format(word=w) for w in DIGIT_WORDS]}


# ----------------------------------------------------------------------------------------- tokenizer

def _word_symbols(token: str) -> list[str]:
    """A BPE token's starting symbols: its characters, the last one carrying ``</w>`` if the token does."""
    end = token.endswith("</w>")
    chars = list(token[:-4] if end else token)
    if end:
        chars[-1] += "</w>"
    return chars


def merges_used(token: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to build ``token`` from its characters (lowest rank first, as Sennrich
    et al. 2016 / OpenAI CLIP's ``bpe``). A final token's merges happen in this order inside any word holding it."""
    symbols, used = _word_symbols(token), []
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, _, best = min(pairs)
        if rank == len(ranks):
            break
        used.append(best)
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return used


def restricted_tokenizer(texts: list[str], max_length: int) -> Any:
    """CLIP's BPE tokenizer (``transformers.CLIPTokenizer``, EOS padding) restricted to ``texts``: every byte
    symbol, every merge that ``texts`` need (in CLIP's order), BOS, EOS. Raises if it splits any of ``texts``
    differently from the full tokenizer."""
    full = clip_tokenizer_from_bpe(model_max_length=max_length)
    merges = read_bpe_merges()
    ranks = {m: r for r, m in enumerate(merges)}
    tokens = {t for text in texts for t in full.tokenize(text)}
    needed = {m for t in tokens for m in merges_used(t, ranks)}
    kept = [m for m in merges if m in needed]
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=clip_vocab(kept), merges=kept, model_max_length=max_length)
    for text in texts:
        if tok.tokenize(text) != full.tokenize(text):
            raise RuntimeError(f"restricted tokenizer splits {text!r} as {tok.tokenize(text)}, "
                               f"CLIP's as {full.tokenize(text)}")
    return tok


def caption_vocabulary_texts(captions: list[str]) -> list[str]:
    """Texts whose words the tokenizer must keep whole: the captions, the prompts and every word the caption
    templates can produce (colours, digit words and numerals, attribute synonyms)."""
    words = [*COLOURS, *DIGIT_WORDS, *map(str, range(10))]
    for table in (THICKNESS_WORDS, SLANT_ADJECTIVES, SLANT_PHRASES):
        words += [w for ws in table.values() for w in ws]
    short = [t.format(d=d) for t in SHORT_CAPTIONS for d in DIGIT_WORDS]
    return sorted(set(captions)) + prompts()["photo"] + prompts()["own"] + short + sorted(set(words))


def short_captions(captions: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``captions`` with a ``fraction`` of them (fixed by ``seed``) replaced by a digit-only wording of
    :data:`SHORT_CAPTIONS`, the digit as a word or a numeral with equal odds."""
    rng = np.random.default_rng([seed, 11])
    out = np.array([str(c) for c in captions], dtype=object)
    for i in np.flatnonzero(rng.random(len(out)) < fraction):
        k = int(labels[i])
        digit = DIGIT_WORDS[k] if rng.random() < 0.5 else str(k)
        out[i] = SHORT_CAPTIONS[rng.integers(len(SHORT_CAPTIONS))].format(d=digit)
    return out.astype(str)


ATTRIBUTES = ("label", "ink", "background", "thickness", "slant")
"""What a caption can name, in the column order of :func:`caption_attributes` and :func:`image_attributes`."""


def caption_attributes(captions: np.ndarray) -> np.ndarray:
    """(N, 5) int32 codes of what each caption names (:data:`ATTRIBUTES`; -1 where it names nothing, as the
    digit-only wordings of :data:`SHORT_CAPTIONS` for everything but the digit)."""
    tables = {"ink": COLOURS, "background": COLOURS, "thickness": THICKNESSES, "slant": SLANTS}
    out = np.full((len(captions), len(ATTRIBUTES)), -1, np.int32)
    for i, text in enumerate(map(str, captions)):
        short = _short_caption_digit(text)
        if short is not None:
            out[i, 0] = short
            continue
        a = parse_caption(text)
        out[i] = [a["label"]] + [-1 if a[k] is None else tables[k].index(a[k]) for k in ATTRIBUTES[1:]]
    return out


def _short_caption_digit(text: str) -> int | None:
    """The digit a :data:`SHORT_CAPTIONS` wording names, or None if ``text`` is not one."""
    for template in SHORT_CAPTIONS:
        for k in range(10):
            if text in (template.format(d=DIGIT_WORDS[k]), template.format(d=k)):
                return k
    return None


def image_attributes(data: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 5) int32 codes of each image's measured :data:`ATTRIBUTES` (a ``load_digits_text`` split)."""
    return np.stack([np.asarray(data[k], np.int32) for k in ATTRIBUTES], axis=1)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
    """(N, max_length) int32 ids: BOS, tokens, EOS, then EOS padding (as CLIP and Stable Diffusion pad)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True).input_ids
    return np.asarray(ids, np.int32)


# ------------------------------------------------------------------------------------- model, training

def model_config(cfg: dict[str, Any], vocab_size: int, eos_token_id: int) -> CLIPConfig:
    """The :class:`CLIPConfig` of the recipe for a tokenizer of ``vocab_size`` ids."""
    proj = cfg["projection_dim"]
    text = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=cfg["max_length"], projection_dim=proj,
                          eos_token_id=eos_token_id, **cfg["text"])
    vision = CLIPVisionConfig(image_size=32, num_channels=3, projection_dim=proj, **cfg["vision"])
    return CLIPConfig(text, vision, projection_dim=proj)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> the model's input, [-1, 1] (the saved image processor: rescale 1/255, mean = std = 0.5)."""
    return (np.asarray(images, np.float32) * 2 - 1).astype(np.float32)


def shift_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each (H, W, C) image moved by its integer ``(dy, dx)`` in ``shifts`` (N, 2), edges replicated (the border
    of these digits is background, so a shift never invents ink)."""
    n, h, w = images.shape[:3]
    m = int(np.abs(shifts).max(initial=0))
    padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    rows = m - shifts[:, 0, None] + np.arange(h)[None, :]  # output row r reads input row r - dy
    cols = m - shifts[:, 1, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ShiftedBatches:
    """A batch source whose images are shifted by up to ``max_shift`` pixels each way (uniform integers, drawn
    from ``(seed, step)``, so deterministic); everything else is ``inner``'s."""

    def __init__(self, inner: Any, max_shift: int, seed: int = 0) -> None:
        self.inner, self.max_shift, self.seed = inner, int(max_shift), seed

    def __getattr__(self, name: str) -> Any:  # arrays, batch_size, position, identity, ...
        return getattr(self.inner, name)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        out = dict(self.inner.batch(step))
        rng = np.random.default_rng((self.seed, 7, step))
        shifts = rng.integers(-self.max_shift, self.max_shift + 1, size=(len(out["x"]), 2))
        out["x"] = shift_images(out["x"], shifts)
        return out

    def identity(self) -> dict[str, Any]:
        return {**self.inner.identity(), "max_shift": self.max_shift}


def batches(cfg: dict[str, Any], arrays: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> Any:
    """The recipe's batch source: random batches, or (``colour_pairs_per_batch`` > 0) batches drawn from that
    many (ink, background) pairs, so colours cannot tell most pairs apart; images shifted by up to ``max_shift``."""
    size = min(cfg["batch_size"], len(arrays["x"]))
    per = cfg.get("colour_pairs_per_batch", 0)
    if per:
        pairs = np.asarray(data["ink"]) * len(COLOURS) + np.asarray(data["background"])
        source: Any = GroupedBatches(arrays, pairs, size, per, seed=cfg["seed"])
    else:
        source = ArrayDataset(arrays, batch_size=size, seed=cfg["seed"])
    shift = cfg.get("max_shift", 0)
    return ShiftedBatches(source, shift, cfg["seed"]) if shift else source


def train(cfg: dict[str, Any], data: dict[str, np.ndarray], tokenizer: Any, *, steps: int | None = None,
          progress: bool = True) -> tuple[CLIPModel, dict[str, Any]]:
    """Train a fresh model of the recipe on ``data`` (a ``load_digits_text`` split); returns it and a record."""
    steps = cfg["steps"] if steps is None else steps
    config = model_config(cfg, len(tokenizer.get_vocab()), tokenizer.eos_token_id)
    model = CLIPModel(config, rngs=nnx.Rngs(cfg["seed"]))
    opt = cfg["optimizer"]
    optimizer = OptimizerConfig(total_steps=max(steps, opt["warmup_steps"] + 1), **opt)
    trainer, state = ContrastiveTrainer.create(model, ContrastiveObjective(), optimizer, sample_shape=(32, 32, 3),
                                               seed=cfg["seed"], ema_decay=0.0)
    captions = short_captions(data["caption"], data["label"], cfg.get("short_caption_fraction", 0.0), cfg["seed"])
    arrays = {"x": to_pixels(data["image"]), "input_ids": tokenize(tokenizer, list(captions), cfg["max_length"])}
    if cfg.get("multi_positive", False):
        arrays["text_attributes"] = caption_attributes(captions)
        arrays["image_attributes"] = image_attributes(data)
    dataset = batches(cfg, arrays, data)
    losses: list[float] = []
    start = time.perf_counter()
    state = fit(trainer, state, dataset, steps, progress=progress,
                callback=lambda step, st, m: losses.append(float(m["loss"])) if step % 25 == 0 or step == steps
                else None)
    seconds = time.perf_counter() - start
    trained = nnx.merge(trainer.graphdef, state.params, state.buffers)
    record = {"steps": steps, "batch_size": dataset.batch_size, "train_pairs": int(len(arrays["x"])),
              "seconds": round(seconds, 1), "epochs": round(steps * dataset.batch_size / len(arrays["x"]), 2),
              "final_loss": losses[-1] if losses else None, "loss_every_25_steps": [round(v, 4) for v in losses]}
    return trained, record


# -------------------------------------------------------------------------------------------- evaluation

def features(model: CLIPModel, tokenizer: Any, texts: list[str], images: np.ndarray, max_length: int,
             chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised text features (len(texts), d) and image features (len(images), d)."""
    text_fn = jax.jit(lambda m, i: m(i))
    image_fn = jax.jit(lambda m, p: m(p))
    tm, im = PureModel.of(model, "get_text_features"), PureModel.of(model, "get_image_features")
    ids = tokenize(tokenizer, texts, max_length)
    pixels = to_pixels(images)
    t = np.concatenate([np.asarray(text_fn(tm, jnp.asarray(ids[i:i + chunk]))) for i in range(0, len(ids), chunk)])
    v = np.concatenate([np.asarray(image_fn(im, jnp.asarray(pixels[i:i + chunk])))
                        for i in range(0, len(pixels), chunk)])
    return t / np.linalg.norm(t, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)


def evaluate(model: CLIPModel, tokenizer: Any, held_out: dict[str, np.ndarray], max_length: int) -> dict[str, Any]:
    """Zero-shot digit accuracy (both prompt wordings), and image -> caption retrieval over the split's captions:
    exact (the image's own caption ranks first) and by content (the top caption names the image's digit, ink
    and background)."""
    labels = np.asarray(held_out["label"])
    out: dict[str, Any] = {"held_out_images": int(len(labels))}
    for name, texts in prompts().items():
        t, v = features(model, tokenizer, texts, held_out["image"], max_length)
        pred = (v @ t.T).argmax(1)
        key = "clip_zero_shot_digit_accuracy" + ("" if name == "photo" else "_own_wording")
        out[key] = float(np.mean(pred == labels))
        if name == "photo":
            out["per_digit_accuracy"] = [round(float(np.mean(pred[labels == k] == k)), 3) if np.any(labels == k)
                                         else None for k in range(10)]
    captions = [str(c) for c in held_out["caption"]]
    t, v = features(model, tokenizer, captions, held_out["image"], max_length)
    top = (v @ t.T).argmax(1)
    out["image_to_caption_retrieval_accuracy"] = float(np.mean(top == np.arange(len(captions))))
    attrs = [parse_caption(captions[j]) for j in top]
    out["image_to_caption_content_accuracy"] = float(np.mean([
        a["label"] == int(held_out["label"][i]) and a["ink"] == COLOURS[held_out["ink"][i]]
        and a["background"] == COLOURS[held_out["background"][i]] for i, a in enumerate(attrs)]))
    out["image_to_caption_digit_accuracy"] = float(np.mean([a["label"] == int(labels[i]) for i, a in enumerate(attrs)]))
    return out


# ---------------------------------------------------------------------------------------------- saving

def save(model: CLIPModel, tokenizer: Any, out: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write ``out`` as a transformers ``CLIPModel`` folder with its tokenizer and image processor config."""
    out = Path(out)
    save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    vocab = tokenizer.get_vocab()  # the slow-tokenizer files too, for readers without tokenizer.json
    (out / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                               ensure_ascii=False) + "\n")
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(
        (m if isinstance(m, str) else " ".join(m)) + "\n" for m in merges), encoding="utf-8")
    size = model.config.vision_config.image_size
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": False, "do_center_crop": False,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
                 "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    if record is not None:
        (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def run(cfg: dict[str, Any], out: str | os.PathLike, *, steps: int | None = None, progress: bool = True,
        data: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Load the data, build the tokenizer, train, evaluate on the held-out split, save; returns the record."""
    data = load_digits_text() if data is None else data
    train_set = data["train"]
    tokenizer = restricted_tokenizer(caption_vocabulary_texts([str(c) for c in train_set["caption"]]
                                                              + [str(c) for c in data["held_out"]["caption"]]),
                                     cfg["max_length"])
    lengths = [len(tokenizer.tokenize(str(c))) + 2 for c in train_set["caption"]]
    if max(lengths) > cfg["max_length"]:
        print(f"warning: {sum(n > cfg['max_length'] for n in lengths)} captions are cut to max_length "
              f"{cfg['max_length']} (longest {max(lengths)} tokens)", file=sys.stderr)
    model, record = train(cfg, train_set, tokenizer, steps=steps, progress=progress)
    metrics = evaluate(model, tokenizer, data["held_out"], cfg["max_length"])
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    record = {"model": "digits-clip", **metrics, "training": record, "parameters": n_params,
              "weights_mb_float32": round(n_params * 4 / 2**20, 3), "vocab_size": len(tokenizer.get_vocab()),
              "longest_caption_tokens": max(lengths), "recipe": {k: v for k, v in cfg.items() if k[0] != "_"},
              "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend()}
    save(model, tokenizer, out, record)
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the transformers CLIPModel + tokenizer")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--config", type=Path, default=CONFIG, help="recipe JSON (default: configs/clip.json)")
    p.add_argument("--json", type=Path, default=None, help="also write the record here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    record = run(load_config(args.config), args.out, steps=args.steps, progress=not args.no_progress)
    text = json.dumps(record, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(f"digits-clip: zero-shot digit accuracy {record['clip_zero_shot_digit_accuracy']:.3f} "
          f"(\"a photo of the digit k\"), {record['clip_zero_shot_digit_accuracy_own_wording']:.3f} "
          f"(\"the digit seven\"), image->caption {record['image_to_caption_retrieval_accuracy']:.3f} exact / "
          f"{record['image_to_caption_content_accuracy']:.3f} digit+colours, {record['parameters']} parameters, "
          f"{record['training']['steps']} steps in {record['training']['seconds']} s -> {args.out}")
    return record


if __name__ == "__main__":
    main()
