"""Prompts, negative prompts, seeds, guidance scales, strengths and step counts never recompile the program."""
from __future__ import annotations

import os

import numpy as np


def test_one_compilation_across_runtime_values(tiny_sd):
    image = np.full((2, 8, 8, 3), 0.5, np.float32)
    base = dict(height=8, width=8, sampler="dpmpp_2m", output="latent")
    from jaxdiff.pipelines.stable_diffusion import generate_latents_jit  # noqa: PLC0415

    generate_latents_jit.clear_cache()  # count this test's programs, whatever other files compiled
    before = generate_latents_jit._cache_size()
    outs = [tiny_sd(["a b", "c"], negative="", steps=3, seed=0, guidance=7.5, **base),
            tiny_sd(["e d", "a a a"], negative="b", steps=3, seed=0, guidance=7.5, **base),
            tiny_sd(["e d", "a a a"], negative="b", steps=3, seed=[4, 9], guidance=7.5, **base),
            tiny_sd(["e d", "a a a"], negative="b", steps=3, seed=[4, 9], guidance=[2.0, 3.0], rescale=0.5, **base),
            tiny_sd(["e d", "a a a"], negative="b", steps=7, seed=[4, 9], guidance=2.0, **base)]
    assert generate_latents_jit._cache_size() == before + 1
    for a, b in zip(outs, outs[1:]):  # every change changed the result
        assert np.abs(a - b).max() > 1e-4
    img = [tiny_sd(["a b", "c"], image=image, strength=s, steps=n, seed=1, **base)
           for s, n in ((0.5, 4), (0.9, 4), (0.3, 10))]
    assert generate_latents_jit._cache_size() == before + 2  # image-to-image: one more program, once
    assert np.abs(img[0] - img[1]).max() > 1e-4


def test_persistent_compilation_cache_is_opt_in(tmp_path, monkeypatch):
    """Run in a fresh process: JAX decides once per process whether its persistent cache is in use, so turning
    it on here would make every later test write its programs to disk (and one XLA:CPU program segfaults there)."""
    import subprocess
    import sys

    from jaxdiff import compile_cache

    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.from_env() is None  # unset: nothing is enabled
    code = ("import jax, jax.numpy as jnp; from jaxdiff import compile_cache as c; p = c.from_env(); "
            "assert jax.config.jax_compilation_cache_dir == str(p), jax.config.jax_compilation_cache_dir; "
            "jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)(jnp.arange(7.0)).block_until_ready(); print(p)")
    env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())  # even a tiny, fast program is written
