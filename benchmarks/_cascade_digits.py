"""The built-in ``digits-cascade`` (Imagen / DeepFloyd IF-style, 8x8 base -> 32x32 super-resolution) on held-out captions.

Part ``digits`` of ``benchmarks/cascade_quality.py``. Prompts are the captions of the judge's held-out digits
(:func:`jaxdiff.data.load_digits_text`), prompt ``i`` sampled with the same key in every configuration; every
stage is sampled by :data:`jaxdiff.pipelines.cascade.cascade_jit` (both stages in one program) or, for the
super-resolution comparisons on given low-resolution images, by the same stage alone
(:func:`jaxdiff.pipelines.cascade.run_stage`). Sampler: DDPM ancestral (``fixed_small``) on ``leading``-spaced
steps per stage (:data:`STEPS`), classifier-free guidance :data:`GUIDANCE` per stage, dynamic thresholding
(ratio 0.95, max 1.5 / 1.0, IF's settings; the super-resolution stage unguided), augmentation level ``t_aug`` = :data:`NOISE_LEVEL` of the 1000-step
cosine image-noising schedule. Figures:

- ``cascade_digit_accuracy`` (>= 0.95): the ``digits-eval`` judge on the final 32x32 images (through
  :func:`~jaxdiff.data.digits_text.judge_input`, 4x4 block means of the measured ink coverage);
  ``base_digit_accuracy``: the same on the 8x8 base images; ``cascade_colour_accuracy`` (ink and background both
  right, as ``benchmarks/text_to_image_quality.py`` measures them);
- ``cascade_fd_vs_floor``: Frechet distance in the judge's features to the held-out digits over the same distance
  of real digits the judge never trained on (the floor);
- ``sr_fd_with_aug`` / ``sr_fd_without_aug``: Frechet distance in digits-clip's 32x32 image features between
  super-resolved base samples (the cascade's setting) and the real held-out 32x32 digits, for the augmented model
  (at ``t_aug`` = :data:`NOISE_LEVEL`) and the ablation trained without augmentation (``t_aug = 0``), with the
  real-vs-real floor in the same features (``sr_fd_upsampled_base``: the base samples upsampled bilinearly);
  ``sr_real_*``: the same models on the real held-out digits' own 8x8 versions (FD and PSNR against the originals;
  ``*_bilinear``: plain bilinear upsampling); ``sr_level_sweep``: the augmented model's FD over ``t_aug``;
- thresholding at high guidance (:data:`HIGH_GUIDANCE` on the base stage): the fraction of base pixels at the clip
  limit (``|x| >= 0.99``) and the cascade's digit accuracy with dynamic vs static thresholding.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sample_quality import Judge, frechet_distance  # noqa: E402
from benchmarks.text_to_image_quality import floor_set  # noqa: E402
from jaxdiff import builtin  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402
from jaxdiff.pipelines import cascade as C  # noqa: E402
from jaxdiff.pipelines import pixel_cascade as P  # noqa: E402

ABLATION = Path(__file__).resolve().parent / "results" / "digits-cascade-no-aug"
STEPS = (50, 50)
GUIDANCE = (4.0, None)  # None: the super-resolution stage reads the caption unguided
NOISE_LEVEL = 100
LEVELS = (0, 250, 500)  # and NOISE_LEVEL, the headline run
HIGH_GUIDANCE = 15.0
CHUNK = 100
SATURATED = 0.99
TARGETS = {"cascade_digit_accuracy": (">=", 0.95)}


def to_unit(x: Any) -> np.ndarray:
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


class ClipFeatures:
    """digits-clip's projected image features of 32x32 RGB images in [0, 1]."""

    def __init__(self) -> None:
        model, _ = builtin.load_clip("digits-clip")
        pure = PureModel.of(model, "get_image_features")
        self.fn = jax.jit(lambda m, p: m(p))
        self.pure = pure

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = jnp.asarray(np.asarray(images, np.float32) * 2 - 1)
        return np.concatenate([np.asarray(self.fn(self.pure, x[i:i + 256])) for i in range(0, len(x), 256)])


def downsample(images: np.ndarray, factor: int = 4) -> np.ndarray:
    """4x4 block means (the base stage's training images)."""
    n, h, w, c = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


def run_cascade(m: P.CascadeModels, context: np.ndarray, uncond: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both stages for every prompt in chunks of :data:`CHUNK` (the last padded; prompt ``i`` keyed by ``i``'s
    chunk and position): (8x8 base, 32x32 final) in [-1, 1]."""
    lows, highs = [], []
    for s in _chunks(len(context)):
        ctx = jnp.asarray(_pad(context[s], CHUNK))
        stages = P.cascade_stages(m, ctx, uncond, **kw)
        lo, hi = C.cascade_jit(stages, jax.random.key(s.start), CHUNK)
        lows.append(np.asarray(lo)[:s.stop - s.start])
        highs.append(np.asarray(hi)[:s.stop - s.start])
    return np.concatenate(lows), np.concatenate(highs)


_run_stage = jax.jit(C.run_stage, static_argnames=("batch",))


def super_resolve(m: P.CascadeModels, low: np.ndarray, context: np.ndarray, uncond: Any, *, sr_network: Any = None,
                  noise_level: int = NOISE_LEVEL) -> np.ndarray:
    """The super-resolution stage alone on given 8x8 images in [-1, 1] (same keys as the cascade's stage 2)."""
    outs = []
    for s in _chunks(len(low)):
        ctx = jnp.asarray(_pad(context[s], CHUNK))
        _, stage = P.cascade_stages(m, ctx, uncond, steps=STEPS, guidance_scales=GUIDANCE, noise_level=noise_level,
                                    sr_network=sr_network)
        key = jax.random.fold_in(jax.random.key(s.start), 1)
        outs.append(np.asarray(_run_stage(stage, jnp.asarray(_pad(low[s], CHUNK)), key, CHUNK))[:s.stop - s.start])
    return np.concatenate(outs)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((to_unit(a) - to_unit(b)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def run(num: int | None = None, seeds: int | None = None) -> dict[str, Any]:
    """The figures of the module docstring on the first ``num`` held-out captions (default all 297)."""
    del seeds
    sets = dt.load_digits_text()
    held = sets["held_out"]
    n = len(held["label"]) if num is None else num
    held = {k: v[:n] for k, v in held.items()}
    labels = np.asarray(held["label"])
    m = builtin.load_cascade("digits-cascade")
    from jaxdiff.convert.folders import load_model_folder
    noaug = PureModel.of(load_model_folder(ABLATION / "stage_2" / "unet"))
    context = np.asarray(m.encode([str(c) for c in held["caption"]]))
    uncond = m.encode([""])[0]
    judge, clip = Judge(), ClipFeatures()
    floor = floor_set(sets, builtin.builtin_config("digits-eval")["training"]["train_images"])
    held_judge = judge.feats(dt.judge_input(sets["held_out"]["image"]))
    judge_floor = frechet_distance(judge.feats(dt.judge_input(floor["image"][:n])), held_judge)
    held_clip = clip(sets["held_out"]["image"])
    clip_floor = frechet_distance(clip(floor["image"][:n]), held_clip)
    out: dict[str, Any] = {"prompts": n, "settings": {
        "sampler": "DDPM ancestral, fixed_small variance, leading spacing (each stage)", "steps": list(STEPS),
        "guidance": list(GUIDANCE), "noise_level": NOISE_LEVEL, "thresholding": "dynamic (ratio 0.95; max 1.5, 1.0)",
        "upsample": "bilinear, aligned corners", "chunk": CHUNK}}

    t0 = time.perf_counter()
    low, high = run_cascade(m, context, uncond, steps=STEPS, guidance_scales=GUIDANCE, noise_level=NOISE_LEVEL)
    out["cascade_seconds"] = round(time.perf_counter() - t0, 1)
    attrs = dt.measure_attributes(to_unit(high), labels)
    feats = judge.feats(dt.judge_input(to_unit(high)))
    fd = frechet_distance(feats, held_judge)
    out.update({
        "cascade_digit_accuracy": float(np.mean(judge.predict(dt.judge_input(to_unit(high))) == labels)),
        "base_digit_accuracy": float(np.mean(judge.predict(dt.judge_input(to_unit(low), 8)) == labels)),
        "cascade_colour_accuracy": float(np.mean((attrs["ink"] == held["ink"]) & (attrs["background"] == held["background"]))),
        "cascade_fd": fd, "fd_floor": judge_floor, "cascade_fd_vs_floor": fd / judge_floor,
        "judge_accuracy_on_held_out": float(np.mean(judge.predict(dt.judge_input(held["image"])) == labels))})

    # super-resolution with and without noise-conditioning augmentation
    t0 = time.perf_counter()
    real_low = downsample(held["image"] * 2 - 1)
    sr = {"aug": dict(sr_network=None, noise_level=NOISE_LEVEL), "noaug": dict(sr_network=noaug, noise_level=0)}
    for name, kw in sr.items():
        on_base = super_resolve(m, low, context, uncond, **kw)
        on_real = super_resolve(m, real_low, context, uncond, **kw)
        suffix = "with_aug" if name == "aug" else "without_aug"
        out[f"sr_fd_{suffix}"] = frechet_distance(clip(to_unit(on_base)), held_clip)
        out[f"sr_digit_accuracy_{suffix}"] = float(np.mean(judge.predict(dt.judge_input(to_unit(on_base))) == labels))
        out[f"sr_real_fd_{suffix}"] = frechet_distance(clip(to_unit(on_real)), held_clip)
        out[f"sr_real_psnr_db_{suffix}"] = psnr_db(on_real, held["image"] * 2 - 1)
    out["sr_fd_floor"] = clip_floor
    bilinear = np.asarray(C.resize_align_corners(jnp.asarray(real_low), (32, 32)))
    out["sr_real_psnr_db_bilinear"] = psnr_db(bilinear, held["image"] * 2 - 1)
    out["sr_real_fd_bilinear"] = frechet_distance(clip(to_unit(bilinear)), held_clip)
    out["sr_fd_upsampled_base"] = frechet_distance(
        clip(to_unit(C.resize_align_corners(jnp.asarray(low), (32, 32)))), held_clip)
    out["sr_level_sweep"] = [{"noise_level": NOISE_LEVEL, "fd": out["sr_fd_with_aug"],
                              "digit_accuracy": out["sr_digit_accuracy_with_aug"]}]
    for level in LEVELS:
        on_base = super_resolve(m, low, context, uncond, noise_level=level)
        out["sr_level_sweep"].append({"noise_level": level, "fd": frechet_distance(clip(to_unit(on_base)), held_clip),
                                      "digit_accuracy": float(np.mean(
                                          judge.predict(dt.judge_input(to_unit(on_base))) == labels))})
    out["sr_level_sweep"].sort(key=lambda r: r["noise_level"])
    out["sr_seconds"] = round(time.perf_counter() - t0, 1)

    # dynamic vs static thresholding at high guidance
    t0 = time.perf_counter()
    out["thresholding"] = {"base_guidance": HIGH_GUIDANCE, "saturation_limit": SATURATED}
    for kind in ("dynamic", "static"):
        lo, hi = run_cascade(m, context, uncond, steps=STEPS, guidance_scales=(HIGH_GUIDANCE, GUIDANCE[1]),
                             noise_level=NOISE_LEVEL, thresholds=(kind, "dynamic"))
        out["thresholding"][kind] = {
            "base_saturation": float(np.mean(np.abs(lo) >= SATURATED)),
            "final_saturation": float(np.mean(np.abs(hi) >= SATURATED)),
            "digit_accuracy": float(np.mean(judge.predict(dt.judge_input(to_unit(hi))) == labels)),
            "colour_accuracy": float(np.mean(
                (lambda a: (a["ink"] == held["ink"]) & (a["background"] == held["background"]))(
                    dt.measure_attributes(to_unit(hi), labels))))}
    real = np.asarray(held["image"]) * 2 - 1
    out["thresholding"]["real_saturation"] = float(np.mean(np.abs(downsample(real)) >= SATURATED))
    out["thresholding_seconds"] = round(time.perf_counter() - t0, 1)
    out["_images"] = {"low": low, "high": high}
    return out


def markdown(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    lines = ["## digits-cascade (8x8 base -> 32x32 super-resolution)", "",
             f"{results['prompts']} held-out captions; {s['sampler']}; steps {s['steps']}, guidance {s['guidance']}, "
             f"augmentation level t_aug = {s['noise_level']}, {s['thresholding']}.", "",
             "| figure | value |", "|---|---|"]
    for k in ("cascade_digit_accuracy", "base_digit_accuracy", "cascade_colour_accuracy", "cascade_fd_vs_floor",
              "sr_fd_with_aug", "sr_fd_without_aug", "sr_fd_floor", "sr_fd_upsampled_base", "sr_real_fd_with_aug",
              "sr_real_fd_without_aug", "sr_real_fd_bilinear", "sr_real_psnr_db_with_aug", "sr_real_psnr_db_without_aug",
              "sr_real_psnr_db_bilinear"):
        v = results.get(k)
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "Augmentation level sweep (augmented model on base samples):", "", "| t_aug | FD | digit acc |",
              "|---|---|---|"]
    lines += [f"| {r['noise_level']} | {r['fd']:.4g} | {r['digit_accuracy']:.3f} |" for r in results["sr_level_sweep"]]
    th = results["thresholding"]
    lines += ["", f"Thresholding at base guidance {th['base_guidance']} (saturation: fraction of pixels with |x| >= "
              f"{th['saturation_limit']}; real 8x8 digits: {th['real_saturation']:.3f}):", "",
              "| thresholding | base saturation | final saturation | digit acc | colour acc |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {th[k]['base_saturation']:.3f} | {th[k]['final_saturation']:.3f} | {th[k]['digit_accuracy']:.3f} "
              f"| {th[k]['colour_accuracy']:.3f} |" for k in ("dynamic", "static")]
    return lines
