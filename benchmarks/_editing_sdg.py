"""Semantic Diffusion Guidance on digits-sd's unconditional model (empty prompt, no CFG) with digits-clip.

Part of ``benchmarks/editing_quality.py``. Every sample starts from seed noise, runs digits-sd's own plan (its
scheduler, 20 steps) on the empty prompt's denoiser wrapped in SDG (:mod:`jaxdiff.semantic_guidance`: the CLIP
loss of the VAE-decoded x0_hat, gradient w.r.t. x0_hat), and is read by the ``digits-eval`` judge:

- ``sdg_image_class_match``: guided by the CLIP image embedding of a held-out digit (content guidance), the
  sample shows the reference's digit (chance 0.10);
- ``sdg_text_accuracy``: guided by the text "the digit k", the sample shows k;
- the sweeps of both over the guidance scale, and the style guidance (Gram matrices of digits-clip's vision
  layers 1-2) effect: the share of samples whose ink and background colours (``measure_attributes``) are the
  reference's, against unguided samples and content guidance.

Scales are chosen on training digits / the wording "number k" with other seeds (``tune``), then reported on the
held-out digits / "the digit k". Samples for different references run in one batch (each sample its own
reference), through the recipe's own denoiser and plan; ``sdg_scale0_max_abs_diff_vs_recipe`` checks that at
scale 0 this equals ``sd("", guidance=1)``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = {"sdg_image_class_match": (">=", 0.80), "sdg_text_accuracy": (">=", 0.80)}
TEXT_TUNE, TEXT_REPORT = "number {k}", "the digit {k}"
SCALES = (0.0, 30.0, 100.0, 300.0)
STYLE_SCALES = (100.0, 1000.0)
STEPS = 20


def setup() -> dict[str, Any]:
    from jaxdiff import builtin
    from jaxdiff import semantic_guidance as sg
    from jaxdiff.data import digits_text as dt

    sd = builtin.load_pipeline("digits-sd")
    return {"sd": sd, "guide": sg.load_guide("digits-clip", decoder=sg.LatentDecoder(sd.models)),
            "judge": builtin.load_builtin("digits-eval"), "data": dt.load_digits_text()}


def generate(sd: Any, loss: Any, scale: float, seeds: Sequence[int], *, steps: int = STEPS,
             through_denoiser: bool = True) -> np.ndarray:
    """Images (N, 32, 32, 3) in [0, 1]: seed i's noise, digits-sd's plan, the empty prompt's denoiser under SDG
    with ``loss`` (its references hold one row per seed, or one shared row), all N in one batch."""
    from jaxdiff import guidance as G
    from jaxdiff import sampling
    from jaxdiff import semantic_guidance as sg

    plan, size, n = sd.plan(steps), sd.default_size, len(seeds)
    ctx = sd.encode_prompt([""])
    den = G.apply(sd.models.denoiser(plan.quantize), G.bind({"context": jnp.broadcast_to(ctx, (n,) + ctx.shape[1:])}),
                  plan.threshold, sg.semantic_guidance(loss, scale, through_denoiser=through_denoiser))
    x = jnp.asarray(sd.initial_noise(list(seeds), n, size, size)) * plan.init_sigma
    lat = sampling.sample(den, plan.sampler, plan.sigmas, x, jax.random.key(0))
    final = float(plan.sigmas.values[plan.sigmas.count])
    return np.asarray(sd.models.decode(lat / np.sqrt(1.0 + final * final)))


def log(*what: Any) -> None:
    import sys

    print("sdg:", *what, file=sys.stderr, flush=True)


def judged(ctx: dict, images: np.ndarray) -> np.ndarray:
    from jaxdiff.data import digits_text as dt

    return np.argmax(np.asarray(ctx["judge"](dt.judge_input(images))), -1)


def text_accuracy(ctx: dict, scale: float, wording: str, per_digit: int, seed0: int, **kw: Any) -> float:
    labels = np.repeat(np.arange(10), per_digit)
    loss = ctx["guide"].loss(text=[wording.format(k=k) for k in labels], **kw)
    seeds = list(range(seed0, seed0 + len(labels)))
    acc = float(np.mean(judged(ctx, generate(ctx["sd"], loss, scale, seeds)) == labels))
    log("text", wording, scale, len(labels), acc)
    return acc


def image_guided(ctx: dict, split: str, scale: float, num: int, seed0: int, style: bool = False,
                 offset: int = 0) -> tuple[np.ndarray, dict]:
    """Samples guided by ``num`` reference images of ``split`` (content, or style with ``style``), and the refs."""
    d = ctx["data"][split]
    idx = np.linspace(offset, len(d["label"]) - 1, num).astype(int)
    ref = {k: np.asarray(v)[idx] for k, v in d.items()}
    kw = dict(content_weight=0.0, style_weight=1.0) if style else {}
    loss = ctx["guide"].loss(image=ref["image"], **kw)
    return generate(ctx["sd"], loss, scale, list(range(seed0, seed0 + num))), ref


def class_match(ctx: dict, split: str, scale: float, num: int, seed0: int) -> float:
    images, ref = image_guided(ctx, split, scale, num, seed0)
    acc = float(np.mean(judged(ctx, images) == ref["label"]))
    log("image", split, scale, num, acc)
    return acc


def colour_match(images: np.ndarray, ref: dict) -> float:
    from jaxdiff.data import digits_text as dt

    a = dt.measure_attributes(images, ref["label"])
    return float(np.mean((a["ink"] == ref["ink"]) & (a["background"] == ref["background"])))


def tune(ctx: dict, scales: Sequence[float], num: int) -> dict[str, Any]:
    """Scale sweeps on the tuning side (training digits, "number k", seeds 10_000+); the best scale of each."""
    text = [(s, text_accuracy(ctx, s, TEXT_TUNE, max(1, num // 10), 10_000)) for s in scales]
    image = [(s, class_match(ctx, "train", s, num, 20_000)) for s in scales]
    return {"text": text, "image": image, "text_scale": max(text, key=lambda p: p[1])[0],
            "image_scale": max(image, key=lambda p: p[1])[0]}


def run(num: int | None = None, seeds: int | None = None) -> dict[str, Any]:
    """``num`` held-out references (default 100) and ``seeds`` samples per digit for text (default 10); tuning
    uses a fifth of each (at least 10 samples)."""
    start = time.perf_counter()
    num = num or 100
    per_digit = seeds or 10
    ctx = setup()
    scales = SCALES if num >= 50 else (0.0, SCALES[2])
    tuned = tune(ctx, scales, max(10, num // 5))
    text_sweep = [(s, text_accuracy(ctx, s, TEXT_REPORT, per_digit, 0)) for s in scales]
    image_sweep, by_scale = [], {}
    for s in scales:
        by_scale[s], ref = image_guided(ctx, "held_out", s, num, 0)
        image_sweep.append((s, float(np.mean(judged(ctx, by_scale[s]) == ref["label"]))))
        log("image held_out", image_sweep[-1])
    ts, isc = tuned["text_scale"], tuned["image_scale"]
    res: dict[str, Any] = {
        "sdg_text_accuracy": dict(text_sweep)[ts], "sdg_text_scale": ts, "sdg_text_scale_sweep": text_sweep,
        "sdg_image_class_match": dict(image_sweep)[isc], "sdg_image_scale": isc, "sdg_image_scale_sweep": image_sweep,
        "sdg_tuning": tuned, "sdg_text_samples": 10 * per_digit, "sdg_image_references": num,
        "sdg_steps": STEPS, "sdg_gradient": "through the denoiser (J_D^T grad L)"}
    # style guidance: colour match to the reference (and its class match), against unguided and content guidance
    style_sweep = []
    for s in STYLE_SCALES[:len(scales) - 2 or 1]:
        images, _ = image_guided(ctx, "held_out", s, num, 0, style=True)
        style_sweep.append((s, colour_match(images, ref), float(np.mean(judged(ctx, images) == ref["label"]))))
        log("style", style_sweep[-1])
    res.update({"sdg_style_colour_match_sweep": style_sweep,
                "sdg_unguided_colour_match": colour_match(by_scale[0.0], ref),
                "sdg_content_colour_match": colour_match(by_scale[isc], ref)})
    plain = ctx["sd"]([""] * 4, seed=[0, 1, 2, 3], steps=STEPS, guidance=1.0, mesh=None)
    mine = generate(ctx["sd"], ctx["guide"].loss(text="number 1"), 0.0, [0, 1, 2, 3])
    res["sdg_scale0_max_abs_diff_vs_recipe"] = float(np.abs(plain - mine).max())
    res["sdg_seconds"] = round(time.perf_counter() - start, 1)
    return res


def markdown(results: dict[str, Any]) -> list[str]:
    from benchmarks._common import check_targets, targets_table

    r = results
    lines = ["### Semantic Diffusion Guidance (digits-sd, empty prompt, no CFG; digits-clip)", "",
             *targets_table(check_targets(r, TARGETS)), "",
             f"Scales tuned on training digits / \"number k\" (text {r['sdg_text_scale']:g}, image "
             f"{r['sdg_image_scale']:g}); reported on {r['sdg_image_references']} held-out references and "
             f"{r['sdg_text_samples']} \"the digit k\" samples.", "",
             "| scale | text accuracy | image class match |", "|---|---|---|"]
    for (s, t), (_, i) in zip(r["sdg_text_scale_sweep"], r["sdg_image_scale_sweep"]):
        lines.append(f"| {s:g} | {t:.3f} | {i:.3f} |")
    lines += ["", f"Style guidance (Gram matrices of digits-clip vision layers 1-2): ink+background colour match to "
              f"the reference, unguided {r['sdg_unguided_colour_match']:.3f}, content guidance "
              f"{r['sdg_content_colour_match']:.3f}; style scale -> (colour match, class match): "
              + ", ".join(f"{s:g} -> ({c:.3f}, {m:.3f})" for s, c, m in r["sdg_style_colour_match_sweep"]) + "."]
    return lines
