"""Null-text inversion on digits-sd (issue 13): reconstruction of held-out real digits at CFG 7.5.

Each held-out digit (``jaxdiff.data.digits_text.load_digits_text()["held_out"]``) with its own caption is inverted
with DDIM at guidance 1 (the pivot, ``STEPS`` steps, the reference's "target" convention), then reconstructed by
DDIM at guidance 7.5 from ``z*_T``:

- ``ddim_inversion_psnr_db``: with the empty prompt's embedding at every step (plain DDIM inversion);
- ``null_text_psnr_db``: with the per-step embeddings of null-text inversion (Mokady et al. 2023; N = 10 Adam
  steps per step, the reference's learning rate and early stop);
- ``ddim_round_trip_guidance1_psnr_db``: DDIM at guidance 1 from the same start (the pivot retraced);
- ``vae_round_trip_psnr_db``: ``decode(encode(x))`` (posterior mean), the ceiling of any latent reconstruction.

PSNR on the [0, 1] RGB images (32x32), averaged over images in dB. Inversion is deterministic: ``seeds`` is unused.
``null_text_seconds_per_image``: null-text inversion wall time per image, batches after the first (compiled).
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

STEPS = 50
GUIDANCE = 7.5
CHUNK = 16
DEFAULT_NUM = 64

TARGETS = {"null_text_gain_db": (">=", 3.0)}
"""The issue asks only that null-text beat DDIM inversion "far" (the paper); read here as at least 3 dB of PSNR."""


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return -10.0 * np.log10(np.maximum(mse, 1e-12))


@jax.jit
def _vae_round_trip(m: Any, latents: Any) -> Any:
    return m.decode(latents)


def run(num: int | None = None, seeds: int | None = None) -> dict:
    """The figures on the first ``num`` held-out digits (default :data:`DEFAULT_NUM`), in batches of :data:`CHUNK`."""
    from jaxdiff import builtin
    from jaxdiff import null_text as nt
    from jaxdiff.data.digits_text import load_digits_text

    held = load_digits_text()["held_out"]
    n = min(int(num or DEFAULT_NUM), len(held["caption"]))
    sd = builtin.load_pipeline("digits-sd")
    chunk = min(CHUNK, n)
    psnr: dict[str, list] = {k: [] for k in ("null_text", "ddim_inversion", "ddim_round_trip", "vae")}
    inner, loss_before, loss_after, times = [], [], [], []
    for lo in range(0, n, chunk):
        idx = np.arange(lo, min(lo + chunk, n))
        idx = np.concatenate([idx, np.full(chunk - idx.size, idx[-1])])  # one batch shape: one compiled program
        keep = min(lo + chunk, n) - lo
        images, captions = held["image"][idx], [str(c) for c in held["caption"][idx]]
        t0 = time.perf_counter()
        inv = nt.invert(sd, images, captions, steps=STEPS, guidance=GUIDANCE)
        jax.block_until_ready(inv.uncond)
        times.append((time.perf_counter() - t0, keep))
        null = nt.reconstruct(sd, inv.latents, captions, inv.uncond, guidance=GUIDANCE)
        ddim = nt.reconstruct(sd, inv.latents, captions, None, guidance=GUIDANCE, steps=STEPS)
        back = nt.reconstruct(sd, inv.latents, captions, None, guidance=1.0, steps=STEPS)
        vae = np.asarray(_vae_round_trip(sd.models, nt.image_latents(sd, images)))
        for key, rec in (("null_text", null), ("ddim_inversion", ddim), ("ddim_round_trip", back), ("vae", vae)):
            psnr[key] += _psnr(rec, images)[:keep].tolist()
        inner.append(np.asarray(inv.inner_steps)[:keep])
        loss_before.append(np.asarray(inv.loss_before)[:keep])
        loss_after.append(np.asarray(inv.loss)[:keep])
    warm = times[1:] or times
    mean = {k: float(np.mean(v)) for k, v in psnr.items()}
    results = {
        "images": n, "steps": STEPS, "guidance": GUIDANCE, "inner_steps_max": 10,
        "null_text_psnr_db": mean["null_text"], "ddim_inversion_psnr_db": mean["ddim_inversion"],
        "null_text_gain_db": mean["null_text"] - mean["ddim_inversion"],
        "ddim_round_trip_guidance1_psnr_db": mean["ddim_round_trip"], "vae_round_trip_psnr_db": mean["vae"],
        "null_text_psnr_db_min": float(np.min(psnr["null_text"])),
        "ddim_inversion_psnr_db_min": float(np.min(psnr["ddim_inversion"])),
        "null_text_better_fraction": float(np.mean(np.asarray(psnr["null_text"]) > np.asarray(psnr["ddim_inversion"]))),
        "inner_steps_mean": float(np.mean(np.concatenate(inner))),
        "step_loss_before_mean": float(np.mean(np.concatenate(loss_before))),
        "step_loss_after_mean": float(np.mean(np.concatenate(loss_after))),
        "null_text_seconds_per_image": float(sum(t for t, _ in warm) / sum(k for _, k in warm)),
        "seconds_per_image_includes_compile": len(times) == 1,
        "per_image_psnr_db": {k: [round(x, 3) for x in v] for k, v in psnr.items()},
    }
    return results


def markdown(results: dict) -> list[str]:
    """The report section: the figures table and one line on the method."""
    from benchmarks._common import check_targets, targets_table

    r = results
    lines = ["## Null-text inversion (Mokady et al. 2023): reconstruction of real digits at CFG "
             f"{r['guidance']:g}", "",
             f"{r['images']} held-out digits with their own captions, digits-sd, DDIM {r['steps']} steps: pivot by "
             "DDIM inversion at guidance 1, then DDIM at the CFG scale from z*_T with the empty prompt (DDIM "
             "inversion) or the per-step optimised null-text embeddings (up to 10 Adam steps per step, lr "
             "1e-2 (1 - i/100), early stop 1e-5 + 2e-5 i). PSNR of the decoded image against the real one, "
             "[0, 1] RGB.", "",
             "| reconstruction | PSNR dB (mean) | min |", "|---|---|---|",
             f"| null-text inversion, CFG {r['guidance']:g} | {r['null_text_psnr_db']:.2f} | "
             f"{r['null_text_psnr_db_min']:.2f} |",
             f"| DDIM inversion, CFG {r['guidance']:g} | {r['ddim_inversion_psnr_db']:.2f} | "
             f"{r['ddim_inversion_psnr_db_min']:.2f} |",
             f"| DDIM inversion, guidance 1 | {r['ddim_round_trip_guidance1_psnr_db']:.2f} | |",
             f"| VAE round trip (ceiling) | {r['vae_round_trip_psnr_db']:.2f} | |", "",
             f"Null-text better on {r['null_text_better_fraction']:.0%} of images; mean Adam steps per sampling step "
             f"{r['inner_steps_mean']:.2f}; per-step loss {r['step_loss_before_mean']:.2e} -> "
             f"{r['step_loss_after_mean']:.2e}; {r['null_text_seconds_per_image']:.2f} s per image "
             f"({'including' if r['seconds_per_image_includes_compile'] else 'excluding'} compilation).", "",
             *targets_table(check_targets(r, TARGETS))]
    return lines
