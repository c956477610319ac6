"""How many CPU devices JAX makes: by default one per core this process may run on.

XLA's CPU backend runs one device's program on one thread at a time, with only part of the work
split across its intra-op pool, so a single CPU device leaves cores idle (a mid-size SD U-Net at a
CFG batch of 2 images ran 1.58x faster on two cores as one device, 2.09x as two devices, issue 10).
jaxdiff therefore asks for one CPU device per core, and its samplers split the CFG-doubled batch
over them (see :func:`jaxdiff.parallel.sampling_mesh`).

Who decides, strongest first:

1. an explicit :func:`configure` call with a count (``jaxdiff sample --cpu-devices N``);
2. the user's own JAX setting: ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, or
   ``jax_num_cpu_devices`` (``JAX_NUM_CPU_DEVICES``) set before jaxdiff is imported;
3. ``$JAXDIFF_CPU_DEVICES`` (``1``: a single device, jaxdiff's behaviour before issue 10);
4. the number of cores in this process's CPU affinity (``os.sched_getaffinity``).

The count must be chosen before the CPU backend starts (the first JAX computation); ``import jaxdiff``
applies 2-4 then, and leaves JAX as it is when the backend is already running (a warning only when a
count was asked for explicitly and differs).

Cost: the network weights are replicated on every device a batch is split over (a sampling run at
batch B uses at most ``2 B`` devices), so memory grows by one copy of the weights per extra device used
(SD 1.5 in float32: about 4 GiB each); the sharded program compiles somewhat slower (SPMD partitioning).
Pass ``--cpu-devices 1`` / ``JAXDIFF_CPU_DEVICES=1`` to trade speed for memory.
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping

ENV = "JAXDIFF_CPU_DEVICES"
XLA_FLAG = "--xla_force_host_platform_device_count"
_warned = False
_ours: int | None = None  # the jax_num_cpu_devices value jaxdiff set (so it is not mistaken for the user's)


def core_count() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_count(value: str, source: str) -> int:
    """A device count from text: a positive integer."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{source} must be a positive number of CPU devices, got {value!r}; use 1 for one device")
    return n


def choose_count(env: Mapping[str, str], cores: int, jax_setting: int = -1) -> int | None:
    """The count jaxdiff asks for when none is passed: None when the user set JAX's own count
    (``XLA_FLAGS`` device count, or ``jax_setting`` >= 0: ``jax_num_cpu_devices``), else
    ``$JAXDIFF_CPU_DEVICES``, else ``cores``."""
    if XLA_FLAG in env.get("XLA_FLAGS", "") or jax_setting >= 0:
        return None
    if env.get(ENV, "").strip():
        return parse_count(env[ENV], f"${ENV}")
    return max(1, int(cores))


def default_count(env: Mapping[str, str] | None = None) -> int | None:
    """:func:`choose_count` for this process: its environment, its cores, JAX's setting (unless jaxdiff made it)."""
    import jax

    setting = int(jax.config.jax_num_cpu_devices)
    return choose_count(os.environ if env is None else env, core_count(), -1 if setting == _ours else setting)


def backend_started() -> bool:
    """Whether JAX's backends are initialised (after which the CPU device count is fixed)."""
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def configure(count: int | None = None, *, env: Mapping[str, str] | None = None) -> int | None:
    """Ask JAX for ``count`` CPU devices (default :func:`default_count`); returns the count set, or None
    when nothing was set (the user's own setting stands, or the backend already runs)."""
    global _warned, _ours
    import jax

    explicit = count is not None
    n = count if explicit else default_count(env)
    if n is None:
        return None
    if n < 1:
        raise ValueError(f"the CPU device count must be at least 1, got {n}")
    if backend_started():
        have = len(jax.devices("cpu"))
        if explicit and have != n and not _warned:
            _warned = True
            warnings.warn(f"JAX already runs with {have} CPU device(s); {n} takes effect only when set before the "
                          f"first JAX computation (set ${ENV}={n} or call jaxdiff.cpu_devices.configure({n}) first)",
                          stacklevel=2)
        return None
    jax.config.update("jax_num_cpu_devices", int(n))
    _ours = int(n)
    return int(n)
