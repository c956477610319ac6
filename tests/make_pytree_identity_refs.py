"""Write tests/data/pytree_identity_refs.npz: every sampler and guidance transform, each run alone.

Run from the repository root:
    python tests/make_pytree_identity_refs.py
Each case (one per sampler in ``jaxdiff.samplers.SAMPLERS``, one per denoiser transform in
``jaxdiff.guidance``) runs in its own fresh Python process, so no other program is in any jit cache
when it compiles: its output is that case's own program's output. tests/test_pytree.py runs all of
them through the same jitted runner in one process and compares. The cases live here so that the
test and this script run exactly the same thing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

from jaxdiff import guidance as G  # noqa: E402
from jaxdiff import mixtures, sampling, schedules  # noqa: E402
from jaxdiff import samplers as S  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pytree_identity_refs.npz")
BATCH, STEPS, CAPACITY, SIGMA_MAX = 4, 5, 6, 10.0
LABELS = (0, 1, -1, 0)

# Options chosen so that no two cases agree mathematically (Euler == DDIM(eta=0) and
# DDPM("fixed_small") == DDIM(eta=1) in exact arithmetic), and small enough to run fast.
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    "euler": {},
    "euler_ancestral": {},
    "ddim": {"eta": 0.5},
    "ddpm": {"variance": "fixed_large"},
    "heun": {"s_churn": 1.0},
    "dpmpp_2m": {},
    "dpmpp_2m_sde": {},
    "unipc": {},
    "langevin": {"n_steps": 3},
    "pc": {},
    "dopri5": {"rtol": 1e-3, "atol": 1e-3},
}


def ring_loss(x0: jax.Array, cond: Any) -> jax.Array:
    """Energy for guidance: squared distance of each sample from the circle of radius 3, (B,)."""
    return (jnp.sqrt(jnp.sum(x0 * x0, axis=-1)) - 3.0) ** 2


# One denoiser transform per class of jaxdiff.guidance that wraps an ``inner`` denoiser, keyed by
# the class name (tests/test_pytree.py checks this covers every such class).
TRANSFORMS: dict[str, Callable[[mixtures.GaussianMixture], Any]] = {
    "ClassifierFree": lambda mix: G.classifier_free(3.0, jnp.full((BATCH,), -1, jnp.int32)),
    "ClassifierGuidance": lambda mix: G.chain(
        G.bind(None), G.classifier_guidance(mixtures.MixtureClassifier(mix), 2.0, jnp.array([1, 0, 1, 1]))),
    "EnergyGuidance": lambda mix: G.energy_guidance(ring_loss, 0.5),
    "StaticThreshold": lambda mix: G.static_threshold(-2.0, 2.0),
    "DynamicThreshold": lambda mix: G.dynamic_threshold(0.6, 2.0),
    "Bound": lambda mix: G.bind(jnp.array([1, 1, 0, 0], jnp.int32)),
}

CASES = [f"sampler:{n}" for n in SAMPLER_OPTIONS] + [f"transform:{n}" for n in TRANSFORMS]


def run_case(case: str) -> np.ndarray:
    """The final sample of ``case`` through :func:`jaxdiff.sample` (the shared jitted runner)."""
    mix = mixtures.ring_2d()
    kind, name = case.split(":")
    if kind == "sampler":
        denoiser, sampler = mix, S.get_sampler(name, **SAMPLER_OPTIONS[name])
    else:
        denoiser, sampler = G.apply(mix, TRANSFORMS[name](mix)), S.Euler()
    sigmas = schedules.karras(STEPS, 0.05, SIGMA_MAX, capacity=CAPACITY)
    x = sampling.initial_noise(jax.random.key(0), (BATCH, 2), SIGMA_MAX)
    out = sampling.sample(denoiser, sampler, sigmas, x, 1, jnp.array(LABELS, jnp.int32))
    return np.asarray(out)


def main() -> None:
    refs = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            path = os.path.join(tmp, f"{i}.npy")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case, path], check=True, env=env)
            refs[case] = np.load(path)
            print(case, refs[case].ravel()[:4])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez(OUT, **refs)
    print(f"wrote {OUT} ({len(refs)} cases)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        np.save(sys.argv[3], run_case(sys.argv[2]))
    else:
        main()
