"""Run in a subprocess with JAXDIFF_CPU_DEVICES=N: sample with the default (split) placement and save the results.

Usage: python _cpu_devices_worker.py OUT.npz TOKDIR
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
sys.path.insert(0, str(Path(__file__).parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
import jaxdiff  # noqa: E402,F401  (sets the CPU device count)
from jaxdiff import builtin, parallel  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import generate_jit  # noqa: E402

TINY = dict(negative="d", steps=3, sampler="dpmpp_2m", seed=4, height=8, width=8, guidance=4.0)
PROMPTS = {"tiny1": ["a c"], "tiny3": ["a c", "b d e", "e"]}
DIGITS = dict(num=3, steps=4, guidance=3.0, seed=2)


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
    import _tiny_sd

    sd = _tiny_sd.build(tokdir)
    res = {k: sd(p, **TINY) for k, p in PROMPTS.items()}
    res["digits"] = builtin.sample_builtin("digits", **DIGITS)
    res["devices"] = np.asarray(jax.device_count())
    res["conv_batches_b1"] = np.asarray(conv_batches(sd, PROMPTS["tiny1"]))
    np.savez(out, **res)


if __name__ == "__main__":
    main()
