"""Cost of jaxdiff's fused sampling loop against bare denoiser calls.

Times, for a small convolutional EDM denoiser: (a) an N-step Euler run compiled as one loop,
(b) N separate jitted denoiser calls chained from Python, (c) a Python loop of N jitted sampler steps.
``overhead_ratio = a / b`` (target <= 1.03) and ``python_loop_ratio = a / c`` (target <= 1).
Usage: ``python benchmarks/loop_overhead.py [--steps 50] [--json PATH]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from _common import emit, machine, parser, time_call
from jaxdiff import sampling, schedules
from jaxdiff.denoisers import EDMDenoiser
from jaxdiff.models._pure import PureModel
from jaxdiff.samplers import Euler


class SmallConvNet(nnx.Module):
    """Three 3x3 convolutions with a noise-level bias: a stand-in for a real network."""

    def __init__(self, channels: int, width: int, rngs: nnx.Rngs):
        self.conv_in = nnx.Conv(channels, width, (3, 3), rngs=rngs)
        self.conv_mid = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.conv_out = nnx.Conv(width, channels, (3, 3), rngs=rngs)
        self.noise_proj = nnx.Linear(1, width, rngs=rngs)

    def __call__(self, x: jax.Array, c_noise: jax.Array, cond: object = None) -> jax.Array:
        h = jax.nn.silu(self.conv_in(x) + self.noise_proj(c_noise[:, None])[:, None, None, :])
        h = jax.nn.silu(self.conv_mid(h))
        return self.conv_out(h)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    net = SmallConvNet(4, args.width, nnx.Rngs(0))
    denoiser = EDMDenoiser(PureModel.of(net))
    sigmas = schedules.karras(args.steps, 0.002, 80.0, capacity=args.steps)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 4)) * 80.0
    key = jax.random.key(1)
    sampler = Euler()
    levels = [jnp.asarray(s) for s in sigmas.used()]

    fused = lambda: sampling.sample_jit(denoiser, sampler, sigmas, x, key, None, False, 0)[0].block_until_ready()  # noqa: E731
    call = jax.jit(lambda d, x, s: d(x, s, None))

    def single_calls() -> None:
        y = x
        for s in levels[:-1]:
            y = call(denoiser, y, s)
        y.block_until_ready()

    step = jax.jit(lambda d, x, s, sn: sampler.step(lambda a, b: d(a, b, None), (), x, s, sn, key)[0])

    def python_loop() -> None:
        y = x
        for s, sn in zip(levels[:-1], levels[1:]):
            y = step(denoiser, y, s, sn)
        y.block_until_ready()

    for f in (fused, single_calls, python_loop):  # compile and warm up
        f()
    t_fused, t_single, t_loop = [], [], []
    for _ in range(args.repeats):  # interleave so drifts in machine load hit all three alike
        t_fused.append(time_call(fused, 1))
        t_single.append(time_call(single_calls, 1))
        t_loop.append(time_call(python_loop, 1))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    a, b, c = med(t_fused), med(t_single), med(t_loop)
    results = {
        "benchmark": "loop_overhead",
        "machine": machine(),
        "config": vars(args) | {"network": "SmallConvNet", "sampler": "euler"},
        "fused_seconds": a,
        "single_calls_seconds": b,
        "python_loop_seconds": c,
        "overhead_ratio": a / b,
        "python_loop_ratio": a / c,
    }
    rows = [{"variant": "fused loop (jaxdiff)", "seconds": a, "ratio": 1.0},
            {"variant": f"{args.steps} jitted denoiser calls", "seconds": b, "ratio": a / b},
            {"variant": "python loop of jitted steps", "seconds": c, "ratio": a / c}]
    emit(results, rows, args.json)


if __name__ == "__main__":
    main()
