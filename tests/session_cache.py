"""The test run's one JAX compilation cache: its environment variable, shared by tests/conftest.py (which points
pytest's processes at it) and worker_runs.tiny_config (which points single-process workers at it). A module of its
own: tests import it by name, and every tier's folder has a `conftest` of its own."""

COMPILATION_CACHE_ENV = "SIMPO_TEST_COMPILATION_CACHE"
