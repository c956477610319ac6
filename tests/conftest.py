"""Shared test settings: float32 everywhere, strict errors for NaN debugging off by default, and one CPU device
(jaxdiff's default is one per core, see jaxdiff.cpu_devices; tests of the split runs ask for more in subprocesses).
The suite runs in two worker processes (pytest-xdist, ``-n 2 --dist loadfile`` in pyproject.toml: one file's tests
stay in one process, so module fixtures are built once): XLA compiles on one thread, so two processes keep both
cores busy while one of them compiles."""
import os

os.environ.setdefault("JAXDIFF_CPU_DEVICES", "1")  # before jaxdiff is imported (it sets the count then)
if "PYTEST_XDIST_WORKER" not in os.environ and not os.environ.get("JAXDIFF_COMPILE_CACHE"):
    # one persistent XLA cache for this run, shared by the workers and the CLI subprocesses (they inherit the
    # variable): many files compile the same programs (digits-sd's loop, the tiny U-Nets), and each module's
    # in-memory programs are dropped after it (below). Removed when the run ends, so never read across runs (a
    # JAXDIFF_COMPILE_CACHE set by the caller is used as it is).
    import atexit
    import shutil
    import tempfile

    _SUITE_CACHE = tempfile.mkdtemp(prefix="jaxdiff-test-xla-")
    os.environ["JAXDIFF_COMPILE_CACHE"] = _SUITE_CACHE
    atexit.register(shutil.rmtree, _SUITE_CACHE, True)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # LLVM at its first optimisation level (workers and CLI subprocesses inherit it): the suite compiles many small
    # programs once each, so compiling dominates: two compile-bound files 72 s -> 59 s, and the execution-bound
    # mixture targets run as fast as at the default level (level 0 compiled faster still but ran those 3-5x slower)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()
if "PYTEST_XDIST_WORKER" in os.environ:  # the suite runs in two processes (pyproject's -n 2): one OpenMP thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for PyTorch's references, else they oversubscribe the cores

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxdiff import compile_cache  # noqa: E402

compile_cache.enable(os.environ["JAXDIFF_COMPILE_CACHE"], min_compile_time_secs=0.2)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each executable's code into memory, and
    one process holding a whole suite's programs (about a thousand tests) ran out of memory mappings (Linux's
    default vm.max_map_count is 65,530), which crashes LLVM inside a later compilation. (The persistent cache above
    turns the recompilation of programs later files share into a load.)"""
    yield
    jax.clear_caches()
    gc.collect()
