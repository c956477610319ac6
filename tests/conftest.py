"""Shared test settings: float32 everywhere, strict errors for NaN debugging off by default, and one CPU device
(jaxdiff's default is one per core, see jaxdiff.cpu_devices; tests of the split runs ask for more in subprocesses)."""
import os

os.environ.setdefault("JAXDIFF_CPU_DEVICES", "1")  # before jaxdiff is imported (it sets the count then)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
