"""Attention and memory: the SD 1.5 U-Net's temporaries at 1024x1024, what the weight ties cost, recording's cost.

1. Memory. The U-Net (``jaxdiff/models/configs/sd15_unet.json``) is built abstractly (``nnx.eval_shape``:
   no weights are allocated), its forward is lowered on abstract inputs (``jax.ShapeDtypeStruct``: 128x128
   latents, batch 2 as under classifier-free guidance, 77 text tokens, bfloat16 weights and compute) and
   compiled for the CPU; ``compiled.memory_analysis().temp_size_in_bytes`` is the scratch memory XLA plans
   for one forward. Each (variant, attention backend) compiles in a fresh subprocess (``--compile-timeout``
   seconds, after which it is reported as skipped). For scale: the full logits of the largest self-attention
   (16384 queries and keys, 8 heads, batch 2) take 8 GiB in bfloat16. Variants: ``jaxdiff`` (as shipped:
   low-precision kernels tied to their layer's input, :mod:`jaxdiff.models.layers.weight_tie`, XLA's default
   scheduler), ``untied`` (without the ties: XLA:CPU's concurrency-optimised scheduler converts every kernel
   to float32 early and holds the copies at once), ``memory_scheduler`` (untied, with
   ``--xla_cpu_enable_concurrency_optimized_scheduler=false``).
2. Tie cost: the mid-size U-Net of ``benchmarks/model_speed.py`` (blocks 64/128/256, 32x32 latents, batch 2)
   in bfloat16, forward traced with and without the ties, timed interleaved in one process (``--rounds``
   rounds of ``--repeats`` calls, medians). float32 kernels are never tied (same program as before).
3. Recording: the same mid-size U-Net in float32, forward with a control that records every
   cross-attention map (:mod:`jaxdiff.models.attention_control`) over the forward without a control,
   timed interleaved in one process.

Keys: ``sd15_1024_temp_gib`` (backend ``"auto"``, as shipped; target <= 2.0), ``temp_gib`` (per variant and
backend: ``auto``, ``blockwise``, ``cpu`` (the dense, query-chunked CPU kernel), ``xla``
(``jax.nn.dot_product_attention``, which materialises the logits)), ``compile_s``, ``largest_logits_gib``,
``tie_time_ratio`` (tied / untied bf16 mid U-Net forward), ``record_overhead_ratio`` (target <= 1.25).

Usage: ``python benchmarks/attention.py [--backends auto,blockwise,cpu,xla] [--variants jaxdiff,untied,memory_scheduler]
[--parts memory,ties,record] [--json PATH]``.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's jaxdiff
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, machine, parser, time_call  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT, BATCH, TOKENS = 128, 2, 77
VARIANTS = {"jaxdiff": "", "untied": "", "memory_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}


def compile_unet(backend: str, variant: str) -> dict:
    """Lower and compile the SD 1.5 U-Net forward with ``backend`` as the attention default."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models import attention, unet
    from jaxdiff.models.layers import weight_tie

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
    ties = contextlib.nullcontext() if variant == "jaxdiff" else weight_tie.untied()
    with attention.default_backend(backend), ties:
        compiled = jax.jit(forward).lower(state, *specs).compile()
    mem = compiled.memory_analysis()
    return {"temp_gib": mem.temp_size_in_bytes / 2 ** 30, "argument_gib": mem.argument_size_in_bytes / 2 ** 30,
            "compile_s": time.perf_counter() - t0}


def _compile_in_subprocess(backend: str, variant: str, timeout: float) -> dict:
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), VARIANTS[variant]) if f)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), XLA_FLAGS=flags)
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", f"{backend}:{variant}"], env=env,
                             check=True, capture_output=True, text=True, timeout=timeout)
        return json.loads(out.stdout.splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"skipped": f"compiling took over {timeout:.0f} s"}
    except subprocess.CalledProcessError as e:
        return {"skipped": "compile failed: " + (e.stderr.strip().splitlines() or ["?"])[-1]}


def memory(args) -> tuple[dict, list]:
    per, rows = {}, []
    for variant in args.variants.split(","):
        for backend in args.backends.split(","):
            r = per.setdefault(variant, {})[backend] = _compile_in_subprocess(backend, variant, args.compile_timeout)
            rows.append({"part": "memory", "variant": variant, "backend": backend,
                         **{k: r.get(k, "-") for k in ("temp_gib", "compile_s")}, "note": r.get("skipped", "")})
            print(variant, backend, r, flush=True)
    return {
        "sd15_1024_temp_gib": per.get("jaxdiff", {}).get("auto", {}).get("temp_gib"),
        "target_sd15_1024_temp_gib": 2.0,
        "temp_gib": {v: {b: r.get("temp_gib") for b, r in d.items()} for v, d in per.items()},
        "compile_s": {v: {b: r.get("compile_s") for b, r in d.items()} for v, d in per.items()},
        "skipped": {f"{v}/{b}": r["skipped"] for v, d in per.items() for b, r in d.items() if "skipped" in r},
        "largest_logits_gib": 2 * BATCH * 8 * (LATENT * LATENT) ** 2 / 2 ** 30,
    }, rows


# ---- timing: the mid-size U-Net of model_speed.py -----------------------------------------------------

def _mid_unet(dtype):
    """The mid-size U-Net of ``benchmarks/model_speed.py`` (random weights in ``dtype``), one CFG batch of inputs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model_speed import UNET, UNET_BATCH
    from jaxdiff.models import unet

    cfg = unet.UNet2DConditionConfig.from_dict(UNET["mid"])
    model = unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    keys = jax.random.split(jax.random.key(1), 2)
    side = cfg.sample_size
    x = jax.random.normal(keys[0], (UNET_BATCH, side, side, cfg.in_channels), dtype)
    text = jax.random.normal(keys[1], (UNET_BATCH, 77, cfg.cross_attention_dim), dtype)
    return nnx.split(model), (x, jnp.full((UNET_BATCH,), 500.0), text)


def _median_ms(fn, args, repeats: int) -> float:
    import jax

    return 1e3 * time_call(lambda: jax.block_until_ready(fn(*args)), repeats)


def _interleaved(fns: dict, args: dict, rounds: int, repeats: int) -> dict:
    import jax

    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_median_ms(fn, args[name], repeats))
    return {"forward_ms": times, "median_ms": {k: statistics.median(v) for k, v in times.items()}}


def tie_cost(rounds: int, repeats: int) -> dict:
    """bfloat16 mid U-Net forward traced with the weight ties over without them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models.layers import weight_tie

    (graphdef, state), inputs = _mid_unet(jnp.bfloat16)
    tied = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    untied = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a) + 0)  # a distinct function: its own trace
    jax.block_until_ready(tied(state, *inputs))
    with weight_tie.untied():
        jax.block_until_ready(untied(state, *inputs))
    r = _interleaved({"tied": tied, "untied": untied}, {"tied": (state, *inputs), "untied": (state, *inputs)},
                     rounds, repeats)
    r["tie_time_ratio"] = r["median_ms"]["tied"] / r["median_ms"]["untied"]
    return r


def record_overhead(rounds: int, repeats: int) -> dict:
    """float32 mid U-Net forward recording every cross-attention map over the plain forward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models import attention_control as ac

    (graphdef, state), inputs = _mid_unet(jnp.float32)
    plain = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    control = ac.Record(ac.CROSS)
    recording = jax.jit(lambda st, c, *a: nnx.merge(graphdef, st)(*a, control=c, return_records=True))
    _, maps = recording(state, control, *inputs)
    r = _interleaved({"plain": plain, "recording": recording},
                     {"plain": (state, *inputs), "recording": (state, control, *inputs)}, rounds, repeats)
    r["sites_recorded"] = len(maps)
    r["record_overhead_ratio"] = r["median_ms"]["recording"] / r["median_ms"]["plain"]
    return r


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backends", default="auto,blockwise,cpu,xla")
    p.add_argument("--variants", default="jaxdiff,untied,memory_scheduler")
    p.add_argument("--parts", default="memory,ties,record")
    p.add_argument("--compile-timeout", type=float, default=180.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--one", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.one:
        print(json.dumps(compile_unet(*args.one.split(":"))))
        return
    parts = args.parts.split(",")
    results: dict = {"machine": machine(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "variants": VARIANTS,
                     "config": {"unet": "sd15_unet.json", "latent": LATENT, "batch": BATCH, "tokens": TOKENS,
                                "dtype": "bfloat16", "timed_unet": "model_speed.py mid, batch 2"},
                     "load_average_start": os.getloadavg()}
    rows: list = []
    if "memory" in parts:
        mem, rows = memory(args)
        results.update(mem)
    if "ties" in parts:
        results["ties"] = tie_cost(args.rounds, args.repeats)
        results["tie_time_ratio"] = results["ties"]["tie_time_ratio"]
        rows.append({"part": "ties", "variant": "tied / untied", "backend": "auto", "temp_gib": "-",
                     "compile_s": "-", "note": f"bf16 mid forward time ratio {results['tie_time_ratio']:.3f}"})
    if "record" in parts:
        results["record"] = record_overhead(args.rounds, args.repeats)
        results["record_overhead_ratio"] = results["record"]["record_overhead_ratio"]
        results["target_record_overhead_ratio"] = 1.25
        rows.append({"part": "record", "variant": "jaxdiff", "backend": "auto", "temp_gib": "-", "compile_s": "-",
                     "note": f"f32 mid forward time ratio {results['record_overhead_ratio']:.3f}"})
    results["load_average_end"] = os.getloadavg()
    emit(results, rows, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
