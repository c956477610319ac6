"""Run in a subprocess with JAXDIFF_CPU_DEVICES=N: sample with the default (split) placement and save the results,
with the other checks that need two devices (user start latents split with the batch, request pytrees split on
their batch axes), so that one process pays the imports and the tiny model's build (tests/test_cpu_devices.py).

Usage: python _cpu_devices_worker.py OUT.npz TOKDIR
"""
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
sys.path.insert(0, str(Path(__file__).parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
import jaxdiff  # noqa: E402,F401  (sets the CPU device count)
from jaxdiff import builtin, compile_cache, parallel  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import generate_jit  # noqa: E402

if os.environ.get(compile_cache.ENV):  # the suite's run-wide cache (tests/conftest.py): conv_batches' ahead-of-time
    compile_cache.enable(os.environ[compile_cache.ENV], min_compile_time_secs=0.2)  # compile of tiny1 is a load

TINY = dict(negative="d", steps=3, sampler="dpmpp_2m", seed=4, height=8, width=8, guidance=4.0)
PROMPTS = {"tiny1": ["a c"], "tiny3": ["a c", "b d e", "e"]}
DIGITS = dict(num=3, steps=4, guidance=3.0, seed=2)
LATENT_PROMPTS = ["a", "b", "c"]  # 3 images on 2 devices: padded to 4
LATENT_KW = dict(negative="", height=16, width=16, steps=2, sampler="ddim", guidance=3.0)


def start_latents(sd) -> np.ndarray:
    """User start latents (NHWC) for LATENT_PROMPTS at LATENT_KW's size."""
    f, c = sd.models.vae_factor, sd.models.latent_channels
    shape = (len(LATENT_PROMPTS), LATENT_KW["height"] // f, LATENT_KW["width"] // f, c)
    return np.random.default_rng(2).standard_normal(shape).astype(np.float32)


def conv_batches(sd, prompts) -> list[int]:
    """The batch sizes of the convolutions in the compiled program one device runs (split or not)."""
    req, plan, static = sd.request(prompts, **TINY)
    mesh = parallel.sampling_mesh(len(prompts))
    req, _ = parallel.shard_request(req, mesh)
    text = generate_jit.lower(sd.placed_models(mesh), plan.sampler, req, None, mesh=mesh,
                              **static).compile().as_text()
    return sorted({int(b) for b in re.findall(r"= f32\[(\d+),\d+,\d+,\d+\]\S* convolution\(", text)})


def main() -> None:
    out, tokdir = sys.argv[1], Path(sys.argv[2])
    import _shard_worker
    import _tiny_sd

    sd = _tiny_sd.build(tokdir)
    res = {k: sd(p, **TINY) for k, p in PROMPTS.items()}
    res["digits"] = builtin.sample_builtin("digits", **DIGITS)
    res["devices"] = np.asarray(jax.device_count())
    res["conv_batches_b1"] = np.asarray(conv_batches(sd, PROMPTS["tiny1"]))
    kw = dict(LATENT_KW, latents=start_latents(sd))
    res["latents_mesh"] = np.asarray(parallel.make_mesh().shape["data"])
    res["latents_generate"] = parallel.generate(sd, LATENT_PROMPTS, **kw)
    res["latents_pmap"] = parallel.pmap_generate(sd, LATENT_PROMPTS, **kw)
    res["latents_default"] = sd(LATENT_PROMPTS, **kw)  # the default split over the devices
    res.update({"shard_" + k: v for k, v in _shard_worker.results().items()})
    np.savez(out, **res)


if __name__ == "__main__":
    main()
