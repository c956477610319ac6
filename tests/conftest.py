"""Shared test settings: float32 everywhere, strict errors for NaN debugging off by default, and one CPU device
(jaxdiff's default is one per core, see jaxdiff.cpu_devices; tests of the split runs ask for more in subprocesses).
The suite runs in two worker processes (pytest-xdist, ``-n 2 --dist loadfile`` in pyproject.toml: one file's tests
stay in one process, so module fixtures are built once): XLA compiles on one thread, so two processes keep both
cores busy while one of them compiles."""
import os

os.environ.setdefault("JAXDIFF_CPU_DEVICES", "1")  # before jaxdiff is imported (it sets the count then)
if "PYTEST_XDIST_WORKER" in os.environ:  # the suite runs in two processes (pyproject's -n 2): one OpenMP thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for PyTorch's references, else they oversubscribe the cores

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each executable's code into memory, and
    one process holding a whole suite's programs (about a thousand tests) ran out of memory mappings (Linux's
    default vm.max_map_count is 65,530), which crashes LLVM inside a later compilation."""
    yield
    jax.clear_caches()
    gc.collect()
