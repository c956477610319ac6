"""Text-to-image quality of the built-in ``digits-sd`` and ``digits-clip``, judged on digits they never saw.

    python benchmarks/text_to_image_quality.py --json benchmarks/results/text_to_image_quality.json

Prompts are the captions of the judge's 297 held-out digits (:func:`jaxdiff.data.load_digits_text`), each
sampled with seed ``i`` at DPM-Solver++ 2M, 20 steps, at every classifier-free guidance scale of the sweep.
Generated images are read back from pixels: the digit by the ``digits-eval`` judge (on
:func:`~jaxdiff.data.digits_text.judge_input`), the ink and background colours and the ink mass by
:func:`~jaxdiff.data.digits_text.measure_attributes`. Reported (issue 11's targets in brackets):

- ``clip_zero_shot_digit_accuracy`` (>= 0.90): digits-clip, nearest of "a photo of the digit k", held-out digits;
- ``vae_recon_psnr_db`` (>= 24) and ``vae_recon_judge_accuracy`` (>= 0.97): digits-sd's autoencoder on them;
- per scale: ``prompt_digit_accuracy`` (>= 0.95 at the best scale >= 2), ``prompt_colour_accuracy`` (ink and
  background both right, >= 0.95), ``thickness_order_accuracy`` (>= 0.90: the same digit, colours, slant wording
  and seed asked "thin" and "thick"; the thick one must have more ink), ``heldout_combination_accuracy``
  (>= 0.80: digit, ink and background right for (digit, ink) pairs never trained on) and ``fd_vs_floor`` (<= 2):
  the Frechet distance in the judge's features between the generated and the held-out digits, over the
  same distance between real digits the judge never trained on (with the held-out labels) and the held-out digits,
  every set read through ``judge_input``.

The headline figures are those at the best scale >= 2 (highest digit accuracy). Writes a Markdown
report (``--md``, default beside the JSON), PNG grids and a plot of accuracy and FD vs scale.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (check_targets, generate_chunked, markdown_path, parser, targets_table,  # noqa: E402
                                write_report)
from benchmarks.sample_quality import Judge, frechet_distance  # noqa: E402
from jaxdiff import builtin  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402
from jaxdiff.pipelines import StableDiffusion  # noqa: E402

SCALES = (1.0, 2.0, 3.0, 5.0, 7.5)
ZERO_SHOT_PROMPT = "a photo of the digit {k}"
TARGETS = {"clip_zero_shot_digit_accuracy": (">=", 0.90), "vae_recon_psnr_db": (">=", 24.0),
           "vae_recon_judge_accuracy": (">=", 0.97), "prompt_digit_accuracy": (">=", 0.95),
           "prompt_colour_accuracy": (">=", 0.95), "thickness_order_accuracy": (">=", 0.90),
           "heldout_combination_accuracy": (">=", 0.80), "fd_vs_floor": ("<=", 2.0)}


# ---- the pieces ------------------------------------------------------------------------------

def resolve(name: str, kind: str) -> Path:
    """A built-in name (``digits-sd`` / ``digits-clip``) or a folder."""
    names = builtin.BUILTIN_PIPELINES if kind == "sd" else builtin.BUILTIN_ENCODERS
    return builtin.builtin_folder(name) if name in names else Path(name)


def zero_shot_accuracy(clip_folder: Path, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """CLIP zero-shot classification (Radford et al. 2021, Sec. 3.1.2): the nearest of the ten prompts by cosine."""
    from jaxdiff.convert.folders import load_model_folder
    from jaxdiff.models.tokenizers import load_tokenizer

    model, tok = load_model_folder(clip_folder), load_tokenizer(clip_folder)
    length = model.config.text_config.max_position_embeddings
    ids = tok([ZERO_SHOT_PROMPT.format(k=k) for k in range(10)], padding="max_length", max_length=length,
              truncation=True).input_ids
    text = np.asarray(jax.jit(lambda m, i: m(i))(PureModel.of(model, "get_text_features"), jnp.asarray(ids)))
    image = np.asarray(jax.jit(lambda m, p: m(p))(PureModel.of(model, "get_image_features"),
                                                  jnp.asarray(images * 2 - 1, jnp.float32)))
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    pred = (image @ text.T).argmax(1)
    return float(np.mean(pred == labels)), pred


def vae_round_trip(sd: StableDiffusion, images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] through the autoencoder (posterior mean, scaled and unscaled as the pipeline does)."""
    m = sd.models
    fn = jax.jit(lambda x: m.decode(m.to_latent(m.encode_image(x)[0])))
    return np.asarray(fn(jnp.asarray(images * 2 - 1, jnp.float32)))


def psnr_db(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def generate(sd: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], guidance: float, *, steps: int,
             sampler: str) -> np.ndarray:
    """One image per prompt (B, 32, 32, 3) in [0, 1], in :func:`generate_chunked`'s batches."""
    return generate_chunked(sd, prompts, seeds, steps=steps, sampler=sampler, guidance=guidance)


def generate_sets(sd: StableDiffusion, sets: dict[str, Sequence[str]], guidance: float, *, steps: int,
                  sampler: str) -> dict[str, np.ndarray]:
    """Each named prompt list's images, prompt i of a list with seed i, all lists in one :func:`generate` call: in
    a compiled batch an image depends only on its prompt and seed, not on the others beside it (bitwise), so
    sharing batches draws the same images with fewer padded ones."""
    prompts = [str(p) for ps in sets.values() for p in ps]
    seeds = np.concatenate([np.arange(len(ps)) for ps in sets.values()])
    images = generate(sd, prompts, seeds, guidance, steps=steps, sampler=sampler)
    return dict(zip(sets, np.split(images, np.cumsum([len(ps) for ps in sets.values()])[:-1])))


def thickness_prompts(held: dict, num: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """``num`` caption pairs differing only in the thickness word ("thin" vs "thick" synonyms): the held-out
    digits' labels, colours and slants, the same template and wording drawn from the same random state."""
    thin, thick = [], []
    for i in range(num):
        args = (int(held["label"][i]), dt.COLOURS[held["ink"][i]], dt.COLOURS[held["background"][i]])
        slant = dt.SLANTS[held["slant"][i]]
        thin.append(dt.caption(*args, "thin", slant, np.random.default_rng([seed, i])))
        thick.append(dt.caption(*args, "thick", slant, np.random.default_rng([seed, i])))
    return thin, thick, np.asarray(held["label"][:num])


def floor_set(sets: dict, judge_train_images: int) -> dict:
    """Real training digits the judge never trained on, one per held-out digit with the same label (FD floor)."""
    train, held = sets["train"], sets["held_out"]
    unseen = np.flatnonzero(train["source"] >= judge_train_images)
    first = unseen[np.unique(train["source"][unseen], return_index=True)[1]]  # one colouring per digit
    chosen, used = [], set()
    for label in held["label"]:
        pick = next(int(j) for j in first if train["label"][j] == label and j not in used)
        used.add(pick)
        chosen.append(pick)
    return {k: v[np.asarray(chosen)] for k, v in train.items()}


def read_back(images: np.ndarray, labels: np.ndarray, judge: Judge) -> dict[str, np.ndarray]:
    """Everything measured from pixels: judged digit, judge features, colours, ink mass."""
    x = dt.judge_input(images)
    attrs = dt.measure_attributes(images, labels)
    return {"digit": judge.predict(x), "features": judge.feats(x), **attrs}


# ---- one guidance scale ----------------------------------------------------------------------

def evaluate_scale(sd: StableDiffusion, scale: float, judge: Judge, prompts: dict, floor: dict,
                   *, steps: int, sampler: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    held, combos = prompts["held"], prompts["combos"]
    t0 = time.perf_counter()
    gen = generate_sets(sd, {"held": held["caption"], "combos": combos["caption"], "thin": prompts["thin"],
                             "thick": prompts["thick"]}, scale, steps=steps, sampler=sampler)
    seconds = time.perf_counter() - t0
    r = read_back(gen["held"], held["label"], judge)
    c = read_back(gen["combos"], combos["label"], judge)
    thin = dt.measure_attributes(gen["thin"], prompts["thickness_labels"])["ink_mass"]
    thick = dt.measure_attributes(gen["thick"], prompts["thickness_labels"])["ink_mass"]
    colours_right = (r["ink"] == held["ink"]) & (r["background"] == held["background"])
    fd = frechet_distance(r["features"], floor["held_features"])
    row = {"guidance": scale,
           "prompt_digit_accuracy": float(np.mean(r["digit"] == held["label"])),
           "prompt_colour_accuracy": float(np.mean(colours_right)),
           "prompt_all_accuracy": float(np.mean(colours_right & (r["digit"] == held["label"]))),
           "thickness_order_accuracy": float(np.mean(thick > thin)),
           "heldout_combination_accuracy": float(np.mean((c["digit"] == combos["label"]) & (c["ink"] == combos["ink"])
                                                         & (c["background"] == combos["background"]))),
           "heldout_combination_digit_and_ink_accuracy": float(np.mean((c["digit"] == combos["label"])
                                                                       & (c["ink"] == combos["ink"]))),
           "fd": fd, "fd_vs_floor": fd / floor["fd"], "seconds": round(seconds, 1)}
    return row, gen


# ---- the run ---------------------------------------------------------------------------------

def run(model: str = "digits-sd", clip: str = "digits-clip", *, scales: Sequence[float] = SCALES, num: int | None = None,
        pairs: int = 100, combos: int | None = None, steps: int = 20, sampler: str = "dpmpp_2m",
        png_dir: Path | None = None) -> dict[str, Any]:
    sets = dt.load_digits_text()
    held = sets["held_out"]
    n = len(held["label"]) if num is None else num
    prompts = {"held": {k: v[:n] for k, v in held.items()},
               "combos": {k: v[:combos] for k, v in sets["heldout_combinations"].items()}}
    prompts["thin"], prompts["thick"], prompts["thickness_labels"] = thickness_prompts(held, pairs)
    judge = Judge()
    judge_train = builtin.builtin_config("digits-eval")["training"]["train_images"]
    floor = floor_set(sets, judge_train)
    floor_feats = judge.feats(dt.judge_input(floor["image"][:n]))
    held_feats = judge.feats(dt.judge_input(held["image"]))
    floor_info = {"held_features": held_feats, "fd": frechet_distance(floor_feats, held_feats)}

    clip_acc, _ = zero_shot_accuracy(resolve(clip, "clip"), held["image"], held["label"])
    sd = StableDiffusion.from_pretrained(resolve(model, "sd"))
    recon = vae_round_trip(sd, held["image"])
    results: dict[str, Any] = {
        "model": model, "clip": clip, "sampler": sampler, "steps": steps, "prompts": n, "thickness_pairs": pairs,
        "heldout_combination_prompts": int(len(prompts["combos"]["label"])),
        "clip_zero_shot_digit_accuracy": clip_acc,
        "vae_recon_psnr_db": float(np.mean(psnr_db(recon, held["image"]))),
        "vae_recon_judge_accuracy": float(np.mean(judge.predict(dt.judge_input(recon)) == held["label"])),
        "judge_accuracy_on_held_out": float(np.mean(judge.predict(dt.judge_input(held["image"])) == held["label"])),
        "fd_floor": floor_info["fd"], "sweep": []}
    images: dict[float, dict[str, np.ndarray]] = {}
    for scale in scales:
        row, images[scale] = evaluate_scale(sd, float(scale), judge, prompts, floor_info, steps=steps,
                                             sampler=sampler)
        results["sweep"].append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
    guided = [r for r in results["sweep"] if r["guidance"] >= 2] or results["sweep"]
    best = max(guided, key=lambda r: (r["prompt_digit_accuracy"], -r["fd_vs_floor"]))
    results["best_guidance"] = best["guidance"]
    for key in ("prompt_digit_accuracy", "prompt_colour_accuracy", "thickness_order_accuracy",
                "heldout_combination_accuracy", "fd_vs_floor"):
        results[key] = best[key]
    results["targets"] = check_targets(results, TARGETS)
    if png_dir is not None:
        results["pictures"] = pictures(png_dir, held, prompts, images, best["guidance"], recon, results["sweep"])
    return results


# ---- pictures and report ---------------------------------------------------------------------

def pictures(png_dir: Path, held: dict, prompts: dict, images: dict, best: float, recon: np.ndarray,
             sweep: list[dict]) -> dict[str, str]:
    """PNG grids (real, reconstructions, each scale, thin/thick pairs, held-out combinations) and the sweep plot."""
    png_dir.mkdir(parents=True, exist_ok=True)
    shown = min(40, len(held["label"]))
    files = {"real": builtin.save_grid(held["image"][:shown], png_dir / "t2i_real.png", ncol=10, scale=3),
             "vae": builtin.save_grid(recon[:shown], png_dir / "t2i_vae_reconstructions.png", ncol=10, scale=3)}
    for scale, gen in images.items():
        files[f"guidance_{scale:g}"] = builtin.save_grid(gen["held"][:shown], png_dir / f"t2i_guidance_{scale:g}.png",
                                                         ncol=10, scale=3)
    k = min(10, len(prompts["thin"]))
    pair = np.concatenate([images[best]["thin"][:k], images[best]["thick"][:k]])
    files["thin_thick"] = builtin.save_grid(pair, png_dir / "t2i_thin_vs_thick.png", ncol=k, scale=3)
    files["heldout_combinations"] = builtin.save_grid(images[best]["combos"][:40], png_dir / "t2i_heldout_combinations.png",
                                                      ncol=10, scale=3)
    files["sweep_plot"] = sweep_plot(sweep, png_dir / "t2i_guidance_sweep.png")
    return {k: v.name for k, v in files.items()}


def sweep_plot(sweep: list[dict], path: Path) -> Path:
    """Accuracies (left axis) and FD / floor (right axis) against the guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["guidance"] for r in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("prompt_digit_accuracy", "digit"), ("prompt_colour_accuracy", "colours"),
                       ("thickness_order_accuracy", "thin < thick"), ("heldout_combination_accuracy", "held-out combos")):
        ax.plot(s, [r[key] for r in sweep], marker="o", label=label)
    ax.set_xlabel("classifier-free guidance scale")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    right = ax.twinx()
    right.plot(s, [r["fd_vs_floor"] for r in sweep], color="black", linestyle="--", marker="s", label="FD / floor")
    right.set_ylabel("FD / floor (dashed)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("digits-sd: DPM-Solver++ 2M, 20 steps, held-out captions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    lines = ["# Text-to-image quality: digits-sd and digits-clip", "",
             f"{results['prompts']} held-out captions, {results['thickness_pairs']} thin/thick pairs, "
             f"{results['heldout_combination_prompts']} held-out (digit, ink) combination captions; "
             f"{results['sampler']}, {results['steps']} steps, seed i for prompt i. Judge accuracy on the real "
             f"held-out digits (read back through `judge_input`): {results['judge_accuracy_on_held_out']:.3f}; "
             f"FD floor {results['fd_floor']:.3f}. Headline figures at the best guidance scale >= 2: "
             f"{results['best_guidance']:g}.", "", *targets_table(results["targets"])]
    lines += ["", "Guidance sweep:", "",
              "| scale | digit | colours | digit+colours | thin<thick | held-out combos | combos digit+ink | FD | FD/floor | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sweep"]:
        lines.append(f"| {r['guidance']:g} | {r['prompt_digit_accuracy']:.3f} | {r['prompt_colour_accuracy']:.3f} | "
                     f"{r['prompt_all_accuracy']:.3f} | {r['thickness_order_accuracy']:.3f} | "
                     f"{r['heldout_combination_accuracy']:.3f} | {r['heldout_combination_digit_and_ink_accuracy']:.3f} | "
                     f"{r['fd']:.3f} | {r['fd_vs_floor']:.2f} | {r['seconds']} |")
    m = results["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}. Seconds: generating every "
              "image of the row (held-out, combinations, thin/thick), compilation included in the first.", ""]
    pics = results.get("pictures", {})
    for key, title in (("sweep_plot", "Accuracy and FD vs guidance"), ("real", "Real held-out digits (the prompts' "
                       "sources)"), ("vae", "Their VAE reconstructions"),
                       *((k, f"Generated from the same captions, guidance {k.split('_')[1]}") for k in pics
                         if k.startswith("guidance_")),
                       ("thin_thick", "Thin (top) vs thick (bottom), same seed"),
                       ("heldout_combinations", "Held-out (digit, ink) combinations")):
        if key in pics:
            lines += [f"{title}:", "", f"![{key}]({pics[key]})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="Markdown report (default: the JSON path with .md)")
    p.add_argument("--model", default="digits-sd", help="digits-sd or a Stable Diffusion folder trained the same way")
    p.add_argument("--clip", default="digits-clip", help="digits-clip or a CLIP folder trained the same way")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES), help="guidance scales, comma-separated")
    p.add_argument("--num", type=int, default=None, help="held-out prompts (default all 297)")
    p.add_argument("--pairs", type=int, default=100, help="thin/thick prompt pairs (default 100)")
    p.add_argument("--combos", type=int, default=None, help="held-out combination prompts (default all 136)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    args = p.parse_args(argv)
    md = markdown_path(args.json, args.md)
    t0 = time.perf_counter()
    results = run(args.model, args.clip, scales=[float(s) for s in args.scales.split(",")], num=args.num,
                  pairs=args.pairs, combos=args.combos, steps=args.steps, sampler=args.sampler,
                  png_dir=md.parent if md else None)
    return write_report(results, t0, args.json, md, markdown)


if __name__ == "__main__":
    main()
