"""Runs before any test module imports jax.

- Simulate 8 CPU devices so sharding tests can build real meshes. Single-device code is unaffected (arrays live on
  device 0 and jit runs there unless a mesh says otherwise). A user's own XLA_FLAGS are kept; an explicit device count
  in them wins.
- XLA:CPU's LLVM backend at optimisation level 0 (`--xla_backend_optimization_level=0`): the suite's programs are
  tiny and each runs a few times, so compiling dominates: level 0 took the not-slow tier from 442 s to 275 s on the
  2-core machine, quiet (CPU 859 s -> 510 s); the whole suite, whose long tests mostly run programs, barely moved.
  XLA's own graph passes (fusion, layout, algebraic simplification) still run and matmuls call the same library
  kernels; only the generated loops differ, so results can differ from level 3's in the last float bit (as two
  fusions of the same math can), never in meaning. A test that compares two
  programs bit for bit compiles both under the same setting. An explicit level in the user's XLA_FLAGS wins; runs
  outside the tests keep XLA's default (level 3). The processes tests start get the same level (tests/cpu_env.py),
  but for the guard of the published main job, which runs as a user's command does.
- One persistent JAX compilation cache per test process (each pytest-xdist worker makes its own: JAX writes cache
  files without a lock unless the cache has a size limit, so two workers compiling the same program at once never
  share a directory), shared with every CLI subprocess a test starts (they inherit the environment): the same tiny
  programs compile once per worker instead of once per process. Every
  program is cached, however small or quick to compile. The cache is a fresh directory made for this session and
  removed after it, so nothing compiled by an earlier session (other code, other flags) can be read back: a test
  always runs what this checkout compiles. A hit reuses an executable XLA built from the same program text, compile
  options, XLA flags and jax/jaxlib version (the cache key covers all of them), so it computes the same numbers.
"""

import os
import shutil
import tempfile

import pytest

# An explicit setting of either flag in the user's XLA_FLAGS wins.
for _flag, _value in (("--xla_force_host_platform_device_count", 8), ("--xla_backend_optimization_level", 0)):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_flag}={_value}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

COMPILATION_CACHE = tempfile.mkdtemp(prefix="starling_jax_tests_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # -1: no size floor (0 lets JAX pick one)


# The longest test files, first: with xdist each file goes to one worker in collection order (pyproject's
# --no-loadscope-reorder: by default xdist sends the files with the most tests first, and these have few), so a long
# file collected late leaves one core running it alone at the end. Measured with `--durations` (each takes minutes).
LONGEST_FIRST = ("test_main_job.py", "test_colab.py", "test_smol_starling.py", "test_multiprocess.py", "test_study.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


def pytest_unconfigure(config):
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def random_run(tmp_path_factory):
    """One finished run of the main job's shape with random weights (tests/run_fixtures.make_run) for the whole
    session, shared by the modules that only read it (eval, export). Imported here, not at the top: this file must
    set the environment above before anything imports jax."""
    from run_fixtures import make_run

    return make_run(str(tmp_path_factory.mktemp("random_run")))
