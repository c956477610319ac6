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
# XLA's "most optimisations off" (backend level 0, no expensive LLVM passes) for every program the suite compiles,
# the CLI subprocesses included (they inherit the variable): most files compile small programs and run them a few
# times, so compiling dominates, and they run faster so (the suite 997 s -> 720-930 s over four runs on 2 cores;
# test_controlnet_parity 80 s -> 42-52 s). Files that spend their time *running* programs (the exact mixture
# targets: 4x slower unoptimised) carry the `xla_optimized` mark, which lifts it for that module; they then compile
# at LLVM's first level (as fast to run as the default level, quicker to compile).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's older (LLVM IR) fusion emitters instead of its MLIR ones: they compile in about 40% less time (~28 ms
# against ~48 ms for each eager operation's program; the tiny Stable Diffusion's sampling program 3.0-3.5 s -> 2.0-2.5
# s; test_guidance + test_sd_parity 74 -> 52 s), and the suite spends three quarters of its CPU time tracing and
# compiling. Programs run somewhat slower alone (the exact mixture targets' Langevin test 8 -> 12 s). And one thread
# per program: the two workers fill both cores, and a program splitting its work over a second thread that the other
# worker holds waits for it (an 8192 x 64 normal draw 3.8 -> 7.5 ms beside a busy core; 4.2 ms on one thread).
for _flag, _value in (("xla_backend_optimization_level", "1"), ("xla_cpu_use_fusion_emitters", "false"),
                      ("xla_cpu_multi_thread_eigen", "false")):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()
if "PYTEST_XDIST_WORKER" in os.environ:  # the suite runs in two processes (pyproject's -n 2): one OpenMP thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for PyTorch's references, else they oversubscribe the cores

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxdiff import compile_cache  # noqa: E402

compile_cache.enable(os.environ["JAXDIFF_COMPILE_CACHE"], min_compile_time_secs=0.2)


import gc  # noqa: E402

import pytest  # noqa: E402


LONGEST_FIRST = (  # the files that took longest (mean of two full runs on 2 cores, 73-25 s), longest first
    "tests/samplers/test_exact_targets.py", "tests/benchmarks/test_personalisation_smoke.py",
    "tests/pipelines/test_controlnet_parity.py", "tests/benchmarks/test_text_to_image_quality_smoke.py",
    "tests/test_cpu_devices.py", "tests/pipelines/test_sd_latents.py", "tests/benchmarks/test_control_quality_smoke.py",
    "tests/test_parallel.py", "tests/test_digits_sd_example.py", "tests/test_builtin_digits_sd.py",
    "tests/pipelines/test_sd_parity.py", "tests/models/test_attention_control.py", "tests/test_builtin.py",
    "tests/test_builtin_digits_cascade.py", "tests/pipelines/test_deepfloyd_if.py", "tests/models/test_unet3d.py",
    "tests/test_guidance.py", "tests/pipelines/test_unclip_digits.py", "tests/models/test_unet.py",
    "tests/test_editing_real.py")


def pytest_collection_modifyitems(config, items):
    """Run the longest files first. Under ``--dist loadfile`` each worker takes the next file in collection order
    when it frees, so a long file collected late (alphabetical order) kept one worker busy while the other idled at
    the end (41-55 s of idle worker time in two full runs; 21 s after); longest first, the last files are short.
    The other files keep their order (a stable sort); a listed file that is renamed only loses its place."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _xla_optimization(request):
    """Compile a module marked `xla_optimized` with XLA's optimisations (see JAX_DISABLE_MOST_OPTIMIZATIONS above)."""
    before = jax.config.read("jax_disable_most_optimizations")
    if request.node.get_closest_marker("xla_optimized") is not None:
        jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each executable's code into memory, and
    one process holding a whole suite's programs (about a thousand tests) ran out of memory mappings (Linux's
    default vm.max_map_count is 65,530), which crashes LLVM inside a later compilation. (The persistent cache above
    turns the recompilation of programs later files share into a load.) Releasing only past a mapping count was
    tried: teardowns fell from 101 to 33 s of a run, but calls and setups grew by 345 s across most files (1,033 s
    against 878 s; not separated from the machine's own speed), so every module still releases."""
    yield
    jax.clear_caches()
    gc.collect()
