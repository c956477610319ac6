"""The ``unclip`` part of benchmarks/cascade_quality.py: the built-in ``digits-unclip`` (unCLIP, Ramesh et al. 2022)
measured on the held-out captioned digits.

    python benchmarks/_cascade_unclip.py --json benchmarks/results/cascade_quality_unclip.json [--num 297]

- ``prior_embedding_cosine``: cosine between the prior's image embedding for a held-out caption and the digits-clip
  image embedding of that caption's image (mean over captions), beside two baselines: the caption's own text
  embedding (``baseline_text_embedding_cosine``) and the mean training image embedding of the caption's digit
  (``baseline_class_mean_cosine``) or of its digit + ink + background (``baseline_attribute_mean_cosine``).
- ``variation_class_preservation``: the digits-eval judge reads the input's digit in its variation (decoder from the
  input's digits-clip embedding, new noise); ``variation_colour_preservation``: ink and background measured back
  equal the input's.
- ``text_to_image_digit_accuracy`` / ``text_to_image_colour_accuracy``: prior + decoder from the caption.

Module interface of the cascade benchmark: ``run(num, seeds) -> dict``, ``TARGETS``, ``markdown(figures)``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"variation_class_preservation": (">=", 0.90)}
DEFAULTS = {"prior_steps": 25, "decoder_steps": 20, "prior_guidance": 4.0, "decoder_guidance": 3.0}
CHUNK = 100  # one compiled program per request kind: every batch padded to this size


def _chunks(fn: Any, n: int, **arrays: Any) -> tuple[np.ndarray, np.ndarray]:
    """``fn(**batch, seed=[...])`` over fixed-size batches (the last padded by repetition); outputs concatenated."""
    images, zs = [], []
    for i in range(0, n, CHUNK):
        idx = np.minimum(np.arange(i, i + CHUNK), n - 1)
        im, z = fn(**{k: [v[j] for j in idx] if isinstance(v, list) else v[idx] for k, v in arrays.items()},
                   seed=[int(j) for j in idx])
        images.append(im[: min(CHUNK, n - i)])
        zs.append(z[: min(CHUNK, n - i)])
    return np.concatenate(images), np.concatenate(zs)


def judge_labels(images: np.ndarray) -> np.ndarray:
    """The digits-eval judge's digit for RGB [0, 1] images."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.builtin import load_builtin
    from jaxdiff.data.digits_text import judge_input

    judge = load_builtin("digits-eval")
    fn = jax.jit(lambda x: jnp.argmax(judge(x), -1))
    x = np.asarray(judge_input(images), np.float32)
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + 256]))) for i in range(0, len(x), 256)])


def colours_match(images: np.ndarray, labels: np.ndarray, ink: np.ndarray, background: np.ndarray) -> np.ndarray:
    from jaxdiff.data.digits_text import measure_attributes

    attrs = measure_attributes(images, labels)
    return (attrs["ink"] == np.asarray(ink)) & (attrs["background"] == np.asarray(background))


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def run(num: int | None = None, seeds: int | None = None, folder: str | Path | None = None,
        **settings: Any) -> dict[str, Any]:
    """All figures for the first ``num`` held-out digits (default: all 297), one seed each (``seeds`` > 1 repeats the
    text-to-image run with more seeds per caption: not implemented, one seed per caption). ``folder``: a
    digits-unclip folder other than the built-in (examples/unclip/train.py's output)."""
    from jaxdiff.data import load_digits_text
    from jaxdiff.pipelines import unclip_digits as ud

    s = {**DEFAULTS, **settings}
    data = load_digits_text()
    held = {k: v[: num or len(data["held_out"]["label"])] for k, v in data["held_out"].items()}
    n = len(held["label"])
    pipe = ud.load(folder)
    t0 = time.perf_counter()
    true_z = pipe.embed_images(held["image"])
    train_z = pipe.embed_images(data["train"]["image"])
    captions = [str(c) for c in held["caption"]]

    # baselines of the prior: the caption's text embedding, the per-class means of the training image embeddings
    text_z = _text_embeddings(pipe, captions)
    tr = data["train"]
    by_digit = {d: train_z[tr["label"] == d].mean(0) for d in range(10)}
    by_attr = {}
    for key in set(zip(tr["label"].tolist(), tr["ink"].tolist(), tr["background"].tolist())):
        sel = (tr["label"] == key[0]) & (tr["ink"] == key[1]) & (tr["background"] == key[2])
        by_attr[key] = train_z[sel].mean(0)
    keys = list(zip(held["label"].tolist(), held["ink"].tolist(), held["background"].tolist()))
    attr_z = np.stack([by_attr.get(k, by_digit[k[0]]) for k in keys])
    out: dict[str, Any] = {"held_out_digits": n, "settings": s,
                           "baseline_text_embedding_cosine": _mean_cosine(text_z, true_z),
                           "baseline_class_mean_cosine": _mean_cosine(np.stack([by_digit[d] for d in held["label"]]),
                                                                      true_z),
                           "baseline_attribute_mean_cosine": _mean_cosine(attr_z, true_z),
                           "attribute_means_missing": int(sum(k not in by_attr for k in keys))}

    # text -> prior -> decoder
    t1 = time.perf_counter()
    t2i = lambda prompts, seed: pipe(prompts, seed=seed, prior_steps=s["prior_steps"],  # noqa: E731
                                     decoder_steps=s["decoder_steps"], prior_guidance=s["prior_guidance"],
                                     decoder_guidance=s["decoder_guidance"], return_embeddings=True)
    images, prior_z = _chunks(t2i, n, prompts=captions)
    out["prior_embedding_cosine"] = _mean_cosine(prior_z, true_z)
    out["prior_embedding_cosine_per_caption_min"] = float(np.min(np.sum(prior_z * true_z, 1)))
    labels = judge_labels(images)
    out["text_to_image_digit_accuracy"] = float(np.mean(labels == held["label"]))
    out["text_to_image_colour_accuracy"] = float(np.mean(colours_match(images, held["label"], held["ink"],
                                                                       held["background"])))
    out["text_to_image_seconds"] = round(time.perf_counter() - t1, 1)

    # image variations
    t1 = time.perf_counter()
    var = lambda images, seed: pipe.variations(images, seed=seed, decoder_steps=s["decoder_steps"],  # noqa: E731
                                               decoder_guidance=s["decoder_guidance"], return_embeddings=True)
    variations, _ = _chunks(var, n, images=held["image"])
    vlabels = judge_labels(variations)
    out["judge_accuracy_on_inputs"] = float(np.mean(judge_labels(held["image"]) == held["label"]))
    out["variation_class_preservation"] = float(np.mean(vlabels == held["label"]))
    out["variation_colour_preservation"] = float(np.mean(colours_match(variations, held["label"], held["ink"],
                                                                       held["background"])))
    out["variation_embedding_cosine"] = _mean_cosine(pipe.embed_images(variations), true_z)
    out["variation_pixel_mse"] = float(np.mean((variations - held["image"]) ** 2))  # variations, not copies
    out["variation_seconds"] = round(time.perf_counter() - t1, 1)

    # interpolation: the slerp path between the first two held-out digits of different classes
    j = int(np.flatnonzero(held["label"] != held["label"][0])[0])
    frames = pipe.interpolate(held["image"][0], held["image"][j], 7, seed=0, decoder_steps=s["decoder_steps"],
                              decoder_guidance=s["decoder_guidance"])
    flabels = judge_labels(frames)
    out["interpolation"] = {"from": int(held["label"][0]), "to": int(held["label"][j]),
                            "judged": flabels.tolist()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["_images"] = {"text_to_image": images * 2 - 1, "inputs": held["image"] * 2 - 1,
                      "variations": variations * 2 - 1, "interpolation": frames * 2 - 1}
    return out


def _text_embeddings(pipe: Any, captions: list[str]) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from jaxdiff.pipelines import unclip_digits as ud

    ids = jnp.asarray(ud.tokenize(pipe.tokenizer, captions, pipe.max_length))
    fn = jax.jit(lambda m, i: ud.encode_text(m.clip, i)["text_embeds"])
    return np.concatenate([np.asarray(fn(pipe.models, ids[i:i + 256])) for i in range(0, len(captions), 256)])


def markdown(r: dict[str, Any]) -> list[str]:
    def f(k: str) -> str:
        return f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-"

    s = r["settings"]
    return [
        "## digits-unclip (prior + decoder, unCLIP)", "",
        f"{r['held_out_digits']} held-out captions / images; prior {s['prior_steps']} steps, guidance "
        f"{s['prior_guidance']:g}; decoder {s['decoder_steps']} steps, guidance {s['decoder_guidance']:g} "
        "(DPM-Solver++ 2M both).", "",
        "| figure | value |", "|---|---|",
        f"| `prior_embedding_cosine` (prior's z_i vs the image's) | {f('prior_embedding_cosine')} |",
        f"| baseline: the caption's text embedding | {f('baseline_text_embedding_cosine')} |",
        f"| baseline: mean training image embedding of the digit | {f('baseline_class_mean_cosine')} |",
        f"| baseline: mean of the digit + ink + background | {f('baseline_attribute_mean_cosine')} |",
        f"| `text_to_image_digit_accuracy` (judge) | {f('text_to_image_digit_accuracy')} |",
        f"| `text_to_image_colour_accuracy` (ink and background) | {f('text_to_image_colour_accuracy')} |",
        f"| `variation_class_preservation` (judge) | {f('variation_class_preservation')} |",
        f"| `variation_colour_preservation` | {f('variation_colour_preservation')} |",
        f"| variation embedding cosine to the input | {f('variation_embedding_cosine')} |",
        f"| judge accuracy on the inputs themselves | {f('judge_accuracy_on_inputs')} |",
        f"| interpolation {r['interpolation']['from']} -> {r['interpolation']['to']}, judged frames | "
        f"{' '.join(map(str, r['interpolation']['judged']))} |",
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Stand-alone: this part alone, with its targets, to ``--json`` (and the ``.md`` beside it)."""
    from benchmarks._common import check_targets, markdown_path, parser, targets_table, write_report

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="Markdown report (default: the JSON path with .md)")
    p.add_argument("--num", type=int, default=None, help="held-out digits (default: all 297)")
    p.add_argument("--png", type=Path, default=None, help="write sample grids into this folder")
    p.add_argument("--folder", type=Path, default=None, help="a digits-unclip folder (default: the built-in)")
    for k, v in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args.num, folder=args.folder, **{k: getattr(args, k) for k in DEFAULTS})
    images = res.pop("_images")
    if args.png is not None:
        from jaxdiff.builtin import save_grid

        res["pictures"] = {k: str(save_grid(np.clip((v[:40] + 1) / 2, 0, 1), args.png / f"unclip_{k}.png", ncol=10))
                           for k, v in images.items()}
    res["targets"] = check_targets(res, TARGETS, keep_missing=True)
    md = markdown_path(args.json, args.md)
    return write_report(res, t0, args.json, md, lambda r: "\n".join(
        ["# digits-unclip", "", *targets_table(r["targets"]), "", *markdown(r), "",
         f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; {r['seconds']} s in all."]))


if __name__ == "__main__":
    main()
