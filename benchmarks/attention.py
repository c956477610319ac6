"""Compiled temporary memory of a full-size SD 1.5 U-Net forward at 1024x1024, per attention backend.

The U-Net (``jaxdiff/models/configs/sd15_unet.json``) is built abstractly (``nnx.eval_shape``: no
weights are allocated), its forward is lowered on abstract inputs (``jax.ShapeDtypeStruct``: 128x128
latents, batch 2 as under classifier-free guidance, 77 text tokens, bfloat16 weights and compute) and
compiled for the CPU; ``compiled.memory_analysis().temp_size_in_bytes`` is the scratch memory XLA
plans for one forward. Each backend compiles in a fresh subprocess (``--compile-timeout`` seconds,
after which it is reported as skipped). For scale: the full logits of the largest self-attention
(16384 queries and keys, 8 heads, batch 2) take 8 GiB in bfloat16.

Each is compiled under two XLA:CPU schedulers: ``default`` (the concurrency-optimised scheduler, on
by default in jax 0.10) and ``memory`` (``--xla_cpu_enable_concurrency_optimized_scheduler=false``,
the memory-minimising list scheduler). The bfloat16 U-Net's temporaries depend far more on that choice
than on the attention backend (the CPU computes bfloat16 dots and convolutions on float32 copies).

Keys: ``sd15_1024_temp_gib`` (the default backend ``"auto"``, default scheduler; target <= 2.0),
``sd15_1024_temp_gib_memory_scheduler`` (the same, memory scheduler), ``temp_gib`` (per scheduler and
backend: ``auto``, ``blockwise``, ``cpu`` (the dense, query-chunked CPU kernel), ``xla``
(``jax.nn.dot_product_attention``, which materialises the logits)), ``compile_s``, ``largest_logits_gib``.

Usage: ``python benchmarks/attention.py [--backends auto,blockwise,cpu,xla] [--schedulers default,memory]
[--json PATH]``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's jaxdiff
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, machine, parser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT, BATCH, TOKENS = 128, 2, 77


def compile_unet(backend: str) -> dict:
    """Lower and compile the SD 1.5 U-Net forward with ``backend`` as the attention default."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models import attention, unet

    with open(os.path.join(ROOT, "jaxdiff/models/configs/sd15_unet.json")) as f:
        cfg = unet.UNet2DConditionConfig.from_dict(json.load(f))
    model = nnx.eval_shape(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                             param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)

    def forward(state, x, t, text):
        return nnx.merge(graphdef, state)(x, t, text)

    specs = (jax.ShapeDtypeStruct((BATCH, LATENT, LATENT, cfg.in_channels), jnp.bfloat16),
             jax.ShapeDtypeStruct((BATCH,), jnp.float32),
             jax.ShapeDtypeStruct((BATCH, TOKENS, cfg.cross_attention_dim), jnp.bfloat16))
    t0 = time.perf_counter()
    with attention.default_backend(backend):
        compiled = jax.jit(forward).lower(state, *specs).compile()
    mem = compiled.memory_analysis()
    return {"temp_gib": mem.temp_size_in_bytes / 2 ** 30, "argument_gib": mem.argument_size_in_bytes / 2 ** 30,
            "compile_s": time.perf_counter() - t0}


SCHEDULERS = {"default": "", "memory": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}


def _compile_in_subprocess(backend: str, scheduler: str, timeout: float) -> dict:
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), SCHEDULERS[scheduler]) if f)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), XLA_FLAGS=flags)
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", backend], env=env, check=True,
                             capture_output=True, text=True, timeout=timeout)
        return json.loads(out.stdout.splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"skipped": f"compiling took over {timeout:.0f} s"}
    except subprocess.CalledProcessError as e:
        return {"skipped": "compile failed: " + (e.stderr.strip().splitlines() or ["?"])[-1]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backends", default="auto,blockwise,cpu,xla")
    p.add_argument("--schedulers", default="default,memory")
    p.add_argument("--compile-timeout", type=float, default=180.0)
    p.add_argument("--one", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.one:
        print(json.dumps(compile_unet(args.one)))
        return
    per, rows = {}, []
    for scheduler in args.schedulers.split(","):
        for backend in args.backends.split(","):
            r = per.setdefault(scheduler, {})[backend] = _compile_in_subprocess(backend, scheduler, args.compile_timeout)
            rows.append({"scheduler": scheduler, "backend": backend,
                         **{k: r.get(k, "-") for k in ("temp_gib", "compile_s")}, "note": r.get("skipped", "")})
            print(scheduler, backend, r, flush=True)
    auto = lambda sched: per.get(sched, {}).get("auto", {}).get("temp_gib")  # noqa: E731
    results = {
        "machine": machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "schedulers": SCHEDULERS,
        "config": {"unet": "sd15_unet.json", "latent": LATENT, "batch": BATCH, "tokens": TOKENS, "dtype": "bfloat16"},
        "sd15_1024_temp_gib": auto("default"),
        "sd15_1024_temp_gib_memory_scheduler": auto("memory"),
        "target_sd15_1024_temp_gib": 2.0,
        "temp_gib": {sch: {b: r.get("temp_gib") for b, r in d.items()} for sch, d in per.items()},
        "compile_s": {sch: {b: r.get("compile_s") for b, r in d.items()} for sch, d in per.items()},
        "skipped": {f"{sch}/{b}": r["skipped"] for sch, d in per.items() for b, r in d.items() if "skipped" in r},
        "largest_logits_gib": 2 * BATCH * 8 * (LATENT * LATENT) ** 2 / 2 ** 30,
    }
    emit(results, rows, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
