"""CLIP guidance with a noise-aware CLIP on 8x8 digits (GLIDE, Nichol et al. 2022, Sec. 2.4), end to end.

1. Train a noise-aware digit "CLIP": an image tower ``f(x_t, t)`` (jaxdiff's time-conditioned
   ``DigitClassifier`` with a 16-dimensional head) on images noised on the built-in ``digits`` model's
   cosine VP schedule (t uniform in 0..999, as GLIDE trains its noised CLIP), and a text tower ``g(c)``, one
   learned 16-vector per digit caption; CLIP's contrastive loss against the ten captions (unit-norm features,
   learned temperature).
2. Guide the built-in *unconditional* ``digits`` model (label 10 = null) toward a prompted digit with
   :func:`jaxdiff.clip_guidance.clip_guidance` (the exact DDPM mean shift of eq. 4: ``s Sigma grad (f . g)``),
   100 ancestral steps on the training timesteps, and judge the samples with ``digits-eval``: the fraction
   judged to be the prompted digit, with and without guidance.

    taskset -c 1 python examples/glide/clip_guidance_digits.py --json benchmarks/results/glide_clip_guidance.json

Deterministic when pinned to one core (fixed seeds, one thread).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAXDIFF_CPU_DEVICES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import markdown_path, parser, write_report  # noqa: E402
from jaxdiff import builtin, sampling  # noqa: E402
from jaxdiff import guidance as G  # noqa: E402
from jaxdiff.clip_guidance import NormalizedEmbedding, clip_guidance  # noqa: E402
from jaxdiff.denoisers import DiscreteVPClassifier  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402
from jaxdiff.models.classifier import DigitClassifier, DigitClassifierConfig  # noqa: E402
from jaxdiff.samplers import DDPM  # noqa: E402
from jaxdiff.train import load_digits_dataset  # noqa: E402

DIM, STEPS, BATCH, LR = 16, 1500, 64, 2e-3
SCALES = (0.0, 5.0, 10.0, 20.0, 40.0)
PER_DIGIT, SAMPLE_STEPS = 20, 100


def build(seed: int = 0) -> tuple[DigitClassifier, jax.Array]:
    net = DigitClassifier(DigitClassifierConfig(num_classes=DIM, time_conditioned=True), rngs=nnx.Rngs(seed))
    text = 0.1 * jax.random.normal(jax.random.key(seed + 1), (10, DIM))
    return net, text


def unit(v: jax.Array) -> jax.Array:
    return v * jax.lax.rsqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)


def train(ac: np.ndarray) -> tuple[PureModel, jax.Array, dict]:
    data, held = load_digits_dataset()
    net, text = build()
    graphdef, state = nnx.split(net)
    params = {"net": state, "text": text, "log_scale": jnp.log(jnp.float32(10.0))}
    opt = optax.adam(LR)
    opt_state = opt.init(params)
    sqrt_ac = jnp.sqrt(jnp.asarray(ac))

    def loss_fn(p, x0, y, key):
        k1, k2 = jax.random.split(key)
        t = jax.random.randint(k1, (x0.shape[0],), 0, 1000)
        a = sqrt_ac[t][:, None, None, None]
        x_t = a * x0 + jnp.sqrt(1 - a * a) * jax.random.normal(k2, x0.shape)
        f = unit(nnx.merge(graphdef, p["net"])(x_t, t.astype(jnp.float32)))
        logits = jnp.exp(p["log_scale"]) * f @ unit(p["text"]).T
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x0, y, key):
        loss, g = jax.value_and_grad(loss_fn)(p, x0, y, key)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(0)
    started, loss = time.perf_counter(), None
    for i in range(STEPS):
        idx = rng.choice(len(data["label"]), BATCH, replace=False)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(data["x"][idx]), jnp.asarray(data["label"][idx]),
                                       jax.random.key(i))
    seconds = time.perf_counter() - started
    model = PureModel(params["net"], graphdef)
    # held-out zero-shot accuracy of the noised CLIP at a few training steps
    acc = {}
    for t in (0, 300, 600, 900):
        a = float(sqrt_ac[t])
        noise = np.random.default_rng(t).standard_normal(held["x"].shape).astype(np.float32)
        x_t = a * held["x"] + np.sqrt(1 - a * a) * noise
        f = unit(model(jnp.asarray(x_t), jnp.full((len(x_t),), float(t))))
        acc[f"t_{t}"] = round(float(np.mean(np.argmax(np.asarray(f @ unit(params["text"]).T), 1) == held["label"])), 4)
    record = {"steps": STEPS, "batch": BATCH, "seconds": round(seconds, 1), "final_loss": round(float(loss), 4),
              "held_out_zero_shot_accuracy": acc}
    return model, unit(params["text"]), record


def evaluate(model: PureModel, text: jax.Array, ac: np.ndarray) -> dict:
    den = builtin.load_builtin("digits")
    judge = builtin.load_builtin("digits-eval")
    embed = NormalizedEmbedding(DiscreteVPClassifier(model, jnp.asarray(ac)))
    sigmas = builtin.make_sigmas("digits", "vp_discrete", SAMPLE_STEPS)
    labels = np.repeat(np.arange(10), PER_DIGIT).astype(np.int32)
    null = jnp.full(labels.shape, 10, jnp.int32)

    @jax.jit
    def run(scale, text_rows, key):
        guided = G.apply(den, G.bind(null), clip_guidance(embed, text_rows, scale, schedule=sigmas))
        x = sampling.initial_noise(jax.random.fold_in(key, 1), (len(labels), 8, 8, 1), sigmas.values[0], 1.0)
        out, _ = sampling.sample_jit(guided, DDPM(), sigmas, x, jax.random.fold_in(key, 2), None, False, 0)
        return jnp.argmax(judge(jnp.clip(out, -1, 1)), -1)

    rows = []
    for scale in SCALES:
        pred = np.asarray(run(jnp.float32(scale), text[labels], jax.random.key(0)))
        rows.append({"scale": scale, "accuracy": round(float(np.mean(pred == labels)), 4),
                     "per_digit": [round(float(np.mean(pred[labels == d] == d)), 2) for d in range(10)]})
    return {"rows": rows, "compiles": run._cache_size()}


def markdown(r: dict) -> str:
    lines = ["# CLIP guidance on digits (GLIDE eq. 4, noise-aware CLIP)", "",
             f"Unconditional `digits` guided toward a prompted digit, {SAMPLE_STEPS} DDPM steps, {PER_DIGIT} samples "
             "per digit, judged by `digits-eval`.", "", "| CLIP guidance scale | judged = prompted |", "|---|---|"]
    lines += [f"| {row['scale']:g} | {row['accuracy']:.3f} |" for row in r["guidance"]["rows"]]
    lines += ["", f"Noised CLIP held-out zero-shot accuracy: {r['clip']['held_out_zero_shot_accuracy']}"]
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    started = time.perf_counter()
    ac = builtin.vp_alphas_cumprod(builtin.builtin_config("digits")["adapter"])
    model, text, record = train(ac)
    results = {"clip": record, "guidance": evaluate(model, text, ac)}
    unguided = results["guidance"]["rows"][0]["accuracy"]
    best = max(results["guidance"]["rows"][1:], key=lambda r: r["accuracy"])
    results["clip_guidance_accuracy"] = best["accuracy"]
    results["clip_guidance_best_scale"] = best["scale"]
    results["unguided_accuracy"] = unguided
    write_report(results, started, args.json, markdown_path(args.json, None), markdown)


if __name__ == "__main__":
    main()
