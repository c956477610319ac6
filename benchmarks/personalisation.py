"""Personalisation on digits-sd: LoRA, textual inversion and a hypernetwork, each taught a style the base model
never drew (hollow, outlined strokes), trained here and judged from pixels.

    python benchmarks/personalisation.py --json benchmarks/results/personalisation.json

The concept: 200 training digits redrawn by a fixed transform (:func:`jaxdiff.data.digit_styles.restyle`,
``outline``: the ink keeps a band along the strokes' boundary, hollow inside), captioned as their originals (LoRA and hypernetwork, which act on every prompt once loaded) or with a new token
appended (textual inversion: ``"... <outline>"``, whose embedding is the only thing trained).
Each method trains with optax beside the frozen digits-sd; then, on the 297 held-out captions (seed i):

- ``m_concept_score``: the share of samples prompted with the concept that a classifier trained here calls
  outlined (goal >= 0.90 for LoRA): a small convnet on the measured ink coverage, trained on training digits plain
  and outlined, as drawn and through digits-sd's autoencoder (every sample is decoded by it; a classifier of sharp
  images reads half of the real outlined digits' reconstructions as plain). ``concept_ceiling``: the share of real
  held-out outlined digits it calls outlined after the autoencoder round trip;
- ``m_prompt_digit_accuracy``: the ``digits-eval`` judge reads the asked digit on those samples (on
  ``judge_input(normalise=True)``; the judge reads 0.96 of real outlined held-out digits; >= 0.90);
- ``m_prior_preservation``: digit and colour accuracy on the ordinary captions with the method at scale 0 (must
  equal the base model exactly: ``m_scale0_max_abs_diff``) and at scale 1 (the drop is reported);
- training time, trainable parameter count, file size.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (check_targets, generate_chunked, markdown_path, parser, targets_table,  # noqa: E402
                                write_report)
from jaxdiff.data import digit_styles as ds  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402

STYLE = "outline"
TOKEN = "<outline>"
CONCEPT_EXAMPLES = 200
FILES = {"lora": "outline_lora.safetensors", "textual_inversion": "outline_embedding.safetensors",
         "hypernetwork": "outline_hypernetwork.safetensors"}


def concept_set(train: dict[str, np.ndarray], num: int = CONCEPT_EXAMPLES, seed: int = 0) -> dict[str, Any]:
    """``num`` training digits (distinct sources, drawn with ``seed``) in the concept style, with their captions."""
    rng = np.random.default_rng(seed)
    first = np.unique(train["source"], return_index=True)[1]  # one colouring per source digit
    idx = np.sort(rng.choice(first, num, replace=False))
    return {"image": ds.restyle(train["image"][idx], STYLE), "caption": [str(c) for c in train["caption"][idx]],
            "label": np.asarray(train["label"])[idx], "index": idx}


def with_token(captions: list[str], token: str = TOKEN) -> list[str]:
    """Captions naming the textual-inversion token (one token more: the longest caption then fills digits-clip's 24)."""
    return [f"{c} {token}" for c in captions]


def roundtrip(sd: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] through digits-sd's autoencoder (posterior mean, decoded): the blur that every
    sample of the model carries, whatever its U-Net learned."""
    from jaxdiff import textual_inversion as ti

    return ti.decode_latents(sd, ti.encode_images(sd, images, batch), batch)


def ink_coverage(images: np.ndarray) -> np.ndarray:
    """The measured ink coverage (N, H, W, 1) in [-1, 1]: colour-blind input for the concept classifier."""
    x = np.asarray(images, np.float64)
    bg = dt.measure_background(x)
    return (2.0 * dt.measure_alpha(x, dt.measure_ink(x, bg), bg) - 1.0).astype(np.float32)[..., None]


class ConceptClassifier:
    """Outlined vs plain ink as digits-sd can draw them: a small convnet (:class:`DigitClassifier`, two classes) on
    the ink coverage, trained with optax on the training digits, each source plain and outlined, both as drawn and
    through digits-sd's autoencoder (:func:`roundtrip`). A classifier of sharp images alone calls half the
    autoencoder's reconstructions of real outlined digits plain: it would measure the decoder, not the method.
    Held-out accuracy as drawn in ``accuracy``, through the autoencoder in ``roundtrip_accuracy``; the share of
    held-out outlined digits read as outlined after the round trip (what a perfect method could score) in
    ``ceiling``."""

    def __init__(self, train: dict[str, np.ndarray], held: dict[str, np.ndarray], sd: Any, *, steps: int = 600,
                 seed: int = 0):
        from flax import nnx

        from jaxdiff.losses import ShiftedCrossEntropy
        from jaxdiff.models.classifier import DigitClassifier, DigitClassifierConfig
        from jaxdiff.train import ArrayDataset, ClassifierObjective, OptimizerConfig, Trainer, fit

        first = np.unique(train["source"], return_index=True)[1]  # one colouring per source digit
        plain = train["image"][first]
        styled = ds.restyle(plain, STYLE)
        x = np.concatenate([ink_coverage(v) for v in (plain, roundtrip(sd, plain), styled, roundtrip(sd, styled))])
        labels = np.repeat(np.array([0, 0, 1, 1], np.int32), len(plain))
        net = DigitClassifier(DigitClassifierConfig(block_out_channels=(16, 32, 32), hidden=32, num_classes=2),
                              rngs=nnx.Rngs(seed))
        opt = OptimizerConfig(learning_rate=2e-3, warmup_steps=50, total_steps=steps)
        trainer, state = Trainer.create(net, ClassifierObjective(ShiftedCrossEntropy(2)),
                                        opt, sample_shape=x.shape[1:], seed=seed, ema_decay=0.99, ema_warmup=True)
        state = fit(trainer, state, ArrayDataset({"x": x, "label": labels}, batch_size=64, seed=seed), steps,
                    checkpoint_every=None, log_every=steps, progress=False)
        model = trainer.model(state)
        self.net = jax.jit(lambda x: model(x))
        h, h_styled = held["image"], ds.restyle(held["image"], STYLE)
        self.accuracy = float(np.mean(np.r_[self.predict(h) == 0, self.predict(h_styled) == 1]))
        rt, rt_styled = roundtrip(sd, h), roundtrip(sd, h_styled)
        read_styled = self.predict(rt_styled)  # read once: both figures count it
        self.roundtrip_accuracy = float(np.mean(np.r_[self.predict(rt) == 0, read_styled == 1]))
        self.ceiling = float(np.mean(read_styled == 1))

    def predict(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """1 where ``images`` (N, H, W, 3) in [0, 1] are read as outlined, else 0."""
        x = ink_coverage(images)
        return np.concatenate([np.argmax(np.asarray(self.net(x[i: i + batch])), -1) for i in range(0, len(x), batch)])


# ---- generation and read-back ------------------------------------------------------------------

def generate(sd: Any, prompts: list[str], network_transform: Any = None, *, guidance: float = 3.0,
             steps: int = 20) -> np.ndarray:
    """One image per prompt, seed i for prompt i (in :func:`generate_chunked`'s batches)."""
    return generate_chunked(sd, prompts, range(len(prompts)), network_transform=network_transform, steps=steps,
                            guidance=guidance)


def read_back(images: np.ndarray, held: dict[str, np.ndarray], judge: Any, classifier: ConceptClassifier) -> dict:
    """The share of outlined samples, the judge's digit accuracy (normalised input) and the colour accuracy."""
    n = len(images)
    attrs = dt.measure_attributes(images, held["label"][:n])
    logits = judge(dt.judge_input(images, normalise=True))
    return {"concept_score": float(np.mean(classifier.predict(images) == 1)),
            "digit_accuracy": float(np.mean(np.argmax(logits, -1) == held["label"][:n])),
            "colour_accuracy": float(np.mean((attrs["ink"] == held["ink"][:n])
                                             & (attrs["background"] == held["background"][:n])))}


def folder_of(name: str) -> Path:
    from jaxdiff import builtin

    return builtin.builtin_folder(name) if name in builtin.BUILTIN_PERSONAL else Path(name)


def run(files: str = "digits-outline", *, num: int | None = None, guidance: float = 3.0, steps: int = 20,
        png_dir: Path | None = None) -> dict[str, Any]:
    from jaxdiff import builtin, lora
    from jaxdiff import textual_inversion as ti
    from jaxdiff.models import hypernetwork as hnet

    folder = folder_of(files)
    sets = dt.load_digits_text()
    held = {k: v[:num] if num else v for k, v in sets["held_out"].items()}
    prompts = [str(c) for c in held["caption"]]
    sd = builtin.load_pipeline("digits-sd")
    judge, classifier = builtin.load_builtin("digits-eval"), ConceptClassifier(sets["train"], sets["held_out"], sd)
    look = dict(guidance=guidance, steps=steps)
    record = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
    base = generate(sd, prompts, **look)
    results: dict[str, Any] = {"files": str(files), "prompts": len(prompts), "guidance": guidance, "steps": steps,
                               "concept": record.get("concept", {"style": STYLE}),
                               "concept_classifier_held_out_accuracy": classifier.accuracy,
                               "concept_classifier_roundtrip_accuracy": classifier.roundtrip_accuracy,
                               "concept_ceiling": classifier.ceiling,
                               "base": read_back(base, held, judge, classifier)}
    images = {"base": base}

    def method(name: str, concept: np.ndarray, scale0: np.ndarray, scale1: np.ndarray) -> None:
        c, p0, p1 = (read_back(x, held, judge, classifier) for x in (concept, scale0, scale1))
        rec = record.get(name, {})
        results.update({f"{name}_concept_score": c["concept_score"], f"{name}_prompt_digit_accuracy": c["digit_accuracy"],
                        f"{name}_concept_colour_accuracy": c["colour_accuracy"],
                        f"{name}_prior_preservation": {
                            "scale_0": {**p0, "max_abs_diff_vs_base": float(np.abs(scale0 - base).max())},
                            "scale_1": {**p1, "max_abs_diff_vs_base": float(np.abs(scale1 - base).max())}},
                        f"{name}_training": {k: rec[k] for k in ("seconds", "parameters", "megabytes", "recipe")
                                             if k in rec}})
        images[name] = concept
        print(json.dumps({name: {k: v for k, v in results.items() if k.startswith(name)}}), file=sys.stderr)

    adapter = lora.load_lora(folder / FILES["lora"], sd)
    runs = {}
    for scale in (0.0, 1.0):
        sd_l, net = lora.apply(sd, [adapter], [scale])
        runs[scale] = generate(sd_l, prompts, net, **look)
    method("lora", runs[1.0], runs[0.0], runs[1.0])  # no trigger: loaded at scale 1 it draws every prompt outlined

    sd_t = ti.load_textual_inversion(sd, folder / FILES["textual_inversion"], TOKEN)
    plain_t = generate(sd_t, prompts, **look)  # loaded but not named: the base model
    method("textual_inversion", generate(sd_t, with_token(prompts), **look), plain_t, plain_t)

    hn = hnet.load_hypernetwork(folder / FILES["hypernetwork"])
    runs = {s: generate(sd, prompts, hnet.hypernetworks((hn, s)), **look) for s in (0.0, 1.0)}
    method("hypernetwork", runs[1.0], runs[0.0], runs[1.0])
    results["targets"] = check_targets(results, TARGETS)
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        k = min(10, len(prompts))
        grid = np.concatenate([images[m][:k] for m in ("base", "lora", "textual_inversion", "hypernetwork")])
        results["pictures"] = {"grid": builtin.save_grid(grid, png_dir / "personalisation.png", ncol=k, scale=3).name}
    return results


TARGETS = {"lora_concept_score": (">=", 0.90), "lora_prompt_digit_accuracy": (">=", 0.90),
           "textual_inversion_prompt_digit_accuracy": (">=", 0.90), "hypernetwork_prompt_digit_accuracy": (">=", 0.90)}


def markdown(results: dict) -> str:
    b = results["base"]
    lines = ["# Personalisation on digits-sd: LoRA, textual inversion, hypernetwork (outlined strokes)", "",
             f"{results['prompts']} held-out captions, seed i, DPM-Solver++ 2M {results['steps']} steps, guidance "
             f"{results['guidance']:g}. Concept classifier (outlined vs plain, held-out digits): "
             f"{results['concept_classifier_held_out_accuracy']:.3f} as drawn, "
             f"{results['concept_classifier_roundtrip_accuracy']:.3f} through digits-sd's autoencoder; real outlined "
             f"digits through the autoencoder read as outlined (the ceiling): {results['concept_ceiling']:.3f}. "
             f"Base model: outlined {b['concept_score']:.3f}, "
             f"digit {b['digit_accuracy']:.3f}, colours {b['colour_accuracy']:.3f}.", "",
             *targets_table(results["targets"])]
    lines += ["", "| method | concept score | digit (concept prompts) | colours | prior @0: digit / colours / max diff vs "
              "base | prior @1: digit / colours | train s | parameters | MB |", "|---|---|---|---|---|---|---|---|---|"]
    for m in ("lora", "textual_inversion", "hypernetwork"):
        p0, p1 = results[f"{m}_prior_preservation"]["scale_0"], results[f"{m}_prior_preservation"]["scale_1"]
        t = results[f"{m}_training"]
        lines.append(f"| {m} | {results[f'{m}_concept_score']:.3f} | {results[f'{m}_prompt_digit_accuracy']:.3f} | "
                     f"{results[f'{m}_concept_colour_accuracy']:.3f} | {p0['digit_accuracy']:.3f} / "
                     f"{p0['colour_accuracy']:.3f} / {p0['max_abs_diff_vs_base']:.1e} | {p1['digit_accuracy']:.3f} / "
                     f"{p1['colour_accuracy']:.3f} | {t.get('seconds', '-')} | {t.get('parameters', '-')} | "
                     f"{t.get('megabytes', '-')} |")
    lines += ["", "LoRA and the hypernetwork act on every prompt once loaded (their concept prompts are the plain "
              "captions, so prior @1 is the same run); textual inversion acts only where its token is named (prior "
              "@0 and @1: the token loaded, plain captions).", ""]
    m = results.get("machine", {})
    if m:
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}.", ""]
    if "pictures" in results:
        lines += ["Rows: base model, LoRA, textual inversion (token named), hypernetwork:", "",
                  f"![grid]({results['pictures']['grid']})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="Markdown report (default: the JSON path with .md)")
    p.add_argument("--files", default="digits-outline", help="digits-outline or a folder from train_personal.py")
    p.add_argument("--num", type=int, default=None, help="held-out prompts (default all 297)")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    md = markdown_path(args.json, args.md)
    t0 = time.perf_counter()
    results = run(args.files, num=args.num, steps=args.steps, png_dir=md.parent if md else None)
    return write_report(results, t0, args.json, md, markdown)


if __name__ == "__main__":
    main()
