"""Every test session: gcsfs's plain filesystem class, and one persistent JAX compilation cache for the whole run.

fake-gcs-server speaks GCS's JSON API only. gcsfs picks its filesystem class once, at its first import, from the
environment: by default one that first probes each bucket's layout over gRPC, which the emulator accepts and never
answers (no timeout: a test that imported gcsfs before `gcs_emulator` set the variable hung for pytest's 900 s).

The same SmolLM2 and tiny-model programs (train step, eval step, prefill, decode) are built by many tests, in
pytest's own processes (xdist workers too) and in the single-process workers they start. JAX keys each entry by
the program's HLO, the jax/XLA versions, flags, compile options and device topology, so a hit is the program that
would have been compiled. `tests/run_tiers.py` gives every tier the same directory; a bare `pytest` makes one.
Multi-process CPU runs do not use it: the worker turns the cache off there (see simpo_worker.parallel.compile_cache).
"""

import os
import shutil
import tempfile

import jax

from session_cache import COMPILATION_CACHE_ENV

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

# Set by tests/run_tiers.py for all its tiers, or made here by the session's first process (xdist workers inherit it).
_MADE_HERE = COMPILATION_CACHE_ENV not in os.environ
if _MADE_HERE:
    os.environ[COMPILATION_CACHE_ENV] = tempfile.mkdtemp(prefix="simpo-test-jax-cache-")
TEST_COMPILATION_CACHE = os.environ[COMPILATION_CACHE_ENV]

jax.config.update("jax_compilation_cache_dir", TEST_COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
    if _MADE_HERE and not hasattr(config, "workerinput"):  # the session's own process, not an xdist worker
        shutil.rmtree(TEST_COMPILATION_CACHE)
