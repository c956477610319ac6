"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N: sample the tiny SD data parallel.

Usage: python _parallel_worker.py OUT.npz TOKDIR [PROCESS_ID NUM_PROCESSES PORT]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))

from jaxdiff import parallel  # noqa: E402

PROMPTS = ["a c", "b d e", "b", "e e a", "a b"]
SEEDS = [5, 1, 9, 2, 7]
KW = dict(negative="d", steps=3, sampler="dpmpp_2m", seed=SEEDS, height=8, width=8, guidance=4.0)


def main() -> None:
    out, tokdir = sys.argv[1], Path(sys.argv[2])
    distributed = len(sys.argv) > 3
    if distributed:
        pid, nproc, port = map(int, sys.argv[3:6])
        parallel.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    import jax
    import numpy as np

    import _tiny_sd

    sd = _tiny_sd.build(tokdir / str(jax.process_index()))
    res = {"jit": parallel.generate(sd, PROMPTS, **KW), "devices": np.asarray(jax.device_count())}
    if not distributed:
        res["fsdp"] = parallel.generate(sd, PROMPTS, fsdp=True, fsdp_min_size=64, **KW)
        res["pmap"] = parallel.pmap_generate(sd, PROMPTS, **KW)
    if jax.process_index() == 0:
        np.savez(out, **res)


if __name__ == "__main__":
    main()
