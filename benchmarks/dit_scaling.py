"""DiT scaling on digits (Peebles & Xie 2023): sample quality against forward Gflops, and the conditioning ablation.

    python benchmarks/dit_scaling.py --json benchmarks/results/dit_scaling.json

The runs are the class-conditional DiTs of ``examples/dit/train.py`` (8x8 digits in pixels, patches of 2 or 1,
the same budget each: 3,000 AdamW steps of 64 digits): three sizes with adaLN-Zero (``sizes``) and, at the smallest
size, cross-attention and in-context conditioning (``ablation``). The run installed as the built-in ``digits-dit``
is evaluated from the package's float32 weights, the others from ``examples/dit/weights/`` (float16).

- ``gflops``: XLA's cost analysis (``compiled.cost_analysis()["flops"]``, a multiply-add counts 2) of the jitted
  transformer forward on one 8x8 image, in 1e9 flops (the timestep MLP and class embedding included).
- ``fd_vs_floor``: the Frechet distance between ``digits-eval``'s features of the samples and of the 297 held-out
  digits, over the floor: the same distance for 500 real training digits the judge never saw
  (``benchmarks/sample_quality.py``'s protocol and labels). Samples: DPM-Solver++ 2M, 20 Karras steps up to
  sigma 80 (as the built-in samples), one per label of those 500 digits; with classifier-free guidance 3 (how
  the built-in samples) and without guidance (``fd_vs_floor_unguided``; the paper's scaling plots are unguided).
- ``accuracy``: how often the judge reads the asked label (guided samples; ``accuracy_unguided`` without).

Both are means over three sampling seeds (``--seeds``); ``*_seed_std`` is their spread, the noise of a comparison
between runs (all runs are judged against the same held-out digits).

The paper's claim is that FD falls as Gflops rise; the figures are reported whichever way they fall. Writes the
JSON, a Markdown table, the plot ``dit_scaling.png`` and a 10 x 10 grid per run (``dit_scaling_<run>.png``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, parser  # noqa: E402
from benchmarks.sample_quality import Judge, calibration_digits, frechet_distance, grid_order  # noqa: E402
from jaxdiff import builtin  # noqa: E402
from jaxdiff.pipelines.dit import DiTPipeline  # noqa: E402
from jaxdiff.train import load_digits_dataset  # noqa: E402

WEIGHTS = ROOT / "examples" / "dit" / "weights"
SIZES = ("dit-s2", "dit-s1", "dit-b1")
ABLATION = {"dit-s2": "adaLN-Zero", "dit-s2-cross": "cross-attention", "dit-s2-incontext": "in-context"}
GUIDANCE, STEPS, SAMPLER, SCHEDULE = 3.0, 20, "dpmpp_2m", "karras"


def run_folder(run: str) -> tuple[Path, str]:
    """The folder to evaluate: the package's ``digits-dit`` if it is this run, else the run's float16 copy."""
    shipped = builtin.ASSETS / "digits-dit"
    record = shipped / "training.json"
    if record.is_file() and json.loads(record.read_text()).get("run") == run:
        return shipped, "jaxdiff/assets/digits/digits-dit (float32, shipped)"
    folder = WEIGHTS / run
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"{folder} is missing: train it with python examples/dit/train.py {run}")
    return folder, f"examples/dit/weights/{run} (float16)"


def forward_gflops(pipe: DiTPipeline) -> float:
    """XLA's flop count of the compiled transformer forward at batch 1 (1e9 flops)."""
    net = pipe.models.transformer
    x = jax.ShapeDtypeStruct((1,) + pipe.latent_shape, jnp.float32)
    t, y = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
    cost = jax.jit(lambda n, a, b, c: n(a, b, c)).lower(net, x, t, y).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9


def parameters(pipe: DiTPipeline) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(pipe.models.transformer.state)))


def evaluate(run: str, judge: Judge, held_feats: np.ndarray, floor: float, labels: np.ndarray, seeds: list[int],
             png_dir: Path | None) -> dict[str, Any]:
    folder, source = run_folder(run)
    pipe = DiTPipeline.from_pretrained(folder)
    training = json.loads((folder / "training.json").read_text())
    out: dict[str, Any] = {"name": run, "gflops": round(forward_gflops(pipe), 5), "parameters": parameters(pipe),
                           "patch_size": int(json.loads((folder / "transformer" / "config.json").read_text())
                                             ["patch_size"]),
                           "weights": source, "train_steps": training["steps"], "train_seconds": training["seconds"],
                           "final_loss": training["final_loss"]}
    for tag, scale in (("", GUIDANCE), ("_unguided", 1.0)):
        fds, accs, t0 = [], [], time.perf_counter()
        for seed in seeds:
            imgs = pipe(labels, steps=STEPS, guidance=scale, seed=seed, sampler=SAMPLER, schedule=SCHEDULE,
                        sigma_max=builtin.DIT_SIGMA_MAX)
            x = imgs * 2.0 - 1.0
            fds.append(frechet_distance(judge.feats(x), held_feats))
            accs.append(float(np.mean(judge.predict(x) == labels)))
            if png_dir is not None and not tag and seed == seeds[0]:
                builtin.save_grid(imgs[grid_order(labels)], png_dir / f"dit_scaling_{run}.png", ncol=10, scale=6)
        out[f"fd{tag}"] = round(float(np.mean(fds)), 3)
        out[f"fd_vs_floor{tag}"] = round(float(np.mean(fds)) / floor, 3)
        out[f"fd_vs_floor{tag}_seed_std"] = round(float(np.std(fds)) / floor, 3)
        out[f"fd_vs_floor{tag}_per_seed"] = [round(f / floor, 3) for f in fds]
        out[f"accuracy{tag}"] = round(float(np.mean(accs)), 4)
        out[f"sample_seconds{tag}"] = round((time.perf_counter() - t0) / len(seeds), 1)
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    g = [r["gflops"] for r in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for tag, style, label in (("", "o-", f"guidance {GUIDANCE:g}"), ("_unguided", "s--", "unguided")):
        axes[0].errorbar(g, [r[f"fd_vs_floor{tag}"] for r in sizes], [r[f"fd_vs_floor{tag}_seed_std"] for r in sizes],
                         fmt=style, capsize=3, label=label)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("FD / real-vs-real floor")
    axes[1].plot(g, [r["accuracy"] for r in sizes], "o-", label=f"guidance {GUIDANCE:g}")
    axes[1].plot(g, [r["accuracy_unguided"] for r in sizes], "s--", label="unguided")
    axes[1].set_ylabel("judge accuracy of the asked digit")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(g, [f"{v:.3f}" for v in g])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("forward Gflops (XLA cost analysis, one 8x8 image)")
        for r in sizes:
            y = r["fd_vs_floor"] if ax is axes[0] else r["accuracy"]
            ax.annotate(r["name"], (r["gflops"], y), fontsize=8, textcoords="offset points", xytext=(4, 4))
        ax.legend(fontsize=8)
    fig.suptitle("DiT on 8x8 digits: the same training budget at three sizes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    m = results["machine"]
    head = ("| run | patch | params | Gflops | FD / floor (g=3) | accuracy (g=3) | FD / floor (unguided) | "
            "accuracy (unguided) | final loss | train s |")
    pm = lambda r, tag: f"{r['fd_vs_floor' + tag]:.3f} ± {r['fd_vs_floor' + tag + '_seed_std']:.3f}"  # noqa: E731
    sep = "|---|---|---|---|---|---|---|---|---|---|"

    def row(r: dict, label: str) -> str:
        return (f"| {label} | {r['patch_size']} | {r['parameters']:,} | {r['gflops']:.4f} | {pm(r, '')} | "
                f"{r['accuracy']:.3f} | {pm(r, '_unguided')} | {r['accuracy_unguided']:.3f} | "
                f"{r['final_loss']} | {r['train_seconds']} |")

    lines = ["# DiT scaling on digits", "",
             f"{m['cpu']}, process pinned to cores {m['affinity']}, {m['backend']}, jax {m['jax']}; load average "
             f"{results['load_average']} at the end (the machine was shared). Judge held-out accuracy "
             f"{results['judge_accuracy']:.2%}; FD floor (500 unseen training digits vs the 297 held-out) "
             f"{results['fd_floor']} (bootstrap std of the held-out side {results['fd_floor_bootstrap_std']}). "
             f"{results['num']} samples per run and seed, DPM-Solver++ 2M, {STEPS} Karras steps up to sigma 80; FD / "
             f"floor is the mean over sampling seeds {results['seeds']} ± their standard deviation.", "",
             "## Sizes (adaLN-Zero)", "", head, sep]
    lines += [row(r, r["name"]) for r in results["sizes"]]
    lines += ["", f"FD falls as Gflops rise (guided): {results['fd_falls_with_gflops']} (each drop beyond twice the "
                  f"seed noise: {results['fd_falls_beyond_seed_noise']}); unguided: "
                  f"{results['fd_falls_with_gflops_unguided']} ({results['fd_falls_beyond_seed_noise_unguided']}).",
              "", "![scaling](dit_scaling.png)", "",
              "## Conditioning ablation (smallest size, same budget)", "", head, sep]
    lines += [row(r, f"{r['name']} ({r['conditioning']})") for r in results["ablation"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=500, help="samples per run (and real digits for the floor)")
    p.add_argument("--seeds", type=str, default="0,1,2", help="sampling seeds (FD and accuracy: their mean)")
    p.add_argument("--runs", type=str, default=None, help="comma-separated runs (default: every size and ablation run)")
    args = p.parse_args(argv)
    from benchmarks.sample_quality import held_out_noise

    started = time.perf_counter()
    train, held = load_digits_dataset()
    judge = Judge()
    held_feats = judge.feats(held["x"])
    real = calibration_digits(train, args.num)
    real_feats = judge.feats(real["x"])
    floor = frechet_distance(real_feats, held_feats)
    png_dir = Path(args.json).parent if args.json else None
    wanted = args.runs.split(",") if args.runs else list(dict.fromkeys(SIZES + tuple(ABLATION)))
    seeds = [int(v) for v in args.seeds.split(",")]
    evaluated = {}
    for run in wanted:
        evaluated[run] = evaluate(run, judge, held_feats, floor, real["label"], seeds, png_dir)
        print(json.dumps(evaluated[run]), flush=True)
    sizes = [evaluated[r] for r in SIZES if r in evaluated]
    ablation = [{**evaluated[r], "conditioning": c} for r, c in ABLATION.items() if r in evaluated]
    results: dict[str, Any] = {
        "num": args.num, "seeds": seeds, "guidance": GUIDANCE, "steps": STEPS, "sampler": SAMPLER,
        "schedule": SCHEDULE, "judge_accuracy": round(float(np.mean(judge.predict(held["x"]) == held["label"])), 4),
        "fd_floor": round(floor, 3), "fd_floor_bootstrap_std": round(held_out_noise(real_feats, held_feats), 3),
        "gflops_method": "XLA cost_analysis()['flops'] of the jitted transformer forward, batch 1, 1e9 flops",
        "sizes": sizes, "ablation": ablation}
    for tag in ("", "_unguided"):
        ordered = sorted(sizes, key=lambda r: r["gflops"])
        fds = [r[f"fd_vs_floor{tag}"] for r in ordered]
        stds = [r[f"fd_vs_floor{tag}_seed_std"] for r in ordered]
        results[f"fd_falls_with_gflops{tag}"] = bool(len(fds) > 1 and all(a > b for a, b in zip(fds, fds[1:])))
        # each drop larger than twice the sampling-seed noise of the difference
        results[f"fd_falls_beyond_seed_noise{tag}"] = bool(len(fds) > 1 and all(
            fds[i] - fds[i + 1] > 2.0 * np.hypot(stds[i], stds[i + 1]) for i in range(len(fds) - 1)))
    if len(sizes) > 1:
        results["gflops_span"] = round(max(r["gflops"] for r in sizes) / min(r["gflops"] for r in sizes), 2)
    results["machine"] = machine()
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    cols = ("name", "gflops", "fd_vs_floor", "accuracy", "fd_vs_floor_unguided", "accuracy_unguided")
    table = [{k: r[k] for k in cols} for r in sizes + [a for a in ablation if a["name"] != "dit-s2"]]
    from benchmarks._common import emit

    emit(results, table, args.json)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(markdown(results))
        if len(sizes) > 1:
            plot(results, Path(args.json).with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
