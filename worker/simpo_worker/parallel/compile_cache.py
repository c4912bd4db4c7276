"""JAX's persistent compilation cache for the worker (`compilation_cache` in the config), and what it saved.

JAX keeps each compiled program under a key of its HLO, the jax/XLA versions and flags, its compile options
(device assignment included) and the devices' topology, so a job on another slice shape or process count never
loads a program built for this one. Every host reads the directory; JAX writes entries from process 0 only, each
as one file (one object on gs://, through etils.epath and gcsfs) and never rewrites a key. On TPU the topology is
the slice's, the same on every host, so every host loads the programs that span the slice; a program on one host's
own devices (host_data_parallel decode) has that host's devices in its key, and only host 0's are written.

On CPU the topology in the key is the process's own, so with several processes only host 0 would load: it would
reach the first collective while the others still compile, and gloo gives up after 30 s. The cache is off there.

`CompileLog` counts, per program, the compiles the cache served (hits), those it did not (misses: compiled) and
the seconds spent compiling or loading, from JAX's monitoring events.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import jax

from simpo_worker.contract.config import WorkerConfig
from simpo_worker.store import storage

log = logging.getLogger(__name__)

# JAX's monitoring events: a backend compile (or cache load) of a program, timed and named, and within it the
# cache's hit.
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


def enable(config: WorkerConfig) -> "CompileLog":
    """Point JAX at the cache (after jax.distributed, before the first compile) and start counting compiles."""
    cache = config.compilation_cache
    if not cache.enabled:
        log.info("persistent compilation cache: off (compilation_cache.enabled)")
    elif jax.default_backend() == "cpu" and jax.process_count() > 1:
        log.info("persistent compilation cache: off (CPU with %d processes: only host 0 could load)",
                 jax.process_count())
    else:
        directory = cache.dir or storage.join(config.output_dir, "compilation_cache")
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", cache.min_compile_time_s)
        log.info("persistent compilation cache: %s", directory)
    return CompileLog().install()


@dataclasses.dataclass
class ProgramCompiles:
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0


class CompileLog:
    """Compiles of this process by program name (the jitted function's), since `install`."""

    def __init__(self):
        self.programs: dict[str, ProgramCompiles] = {}
        # A compile's lookup and hit events come on its own thread, before its duration event.
        self._current = threading.local()

    def install(self) -> "CompileLog":
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def _on_event(self, event: str, **_: Any) -> None:
        if event == CACHE_HIT:
            self._current.hit = True

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event != BACKEND_COMPILE:
            return
        program = self.programs.setdefault(kwargs["fun_name"], ProgramCompiles())
        if getattr(self._current, "hit", False):
            program.hits += 1
        else:
            program.misses += 1
        program.seconds += duration
        self._current.hit = False

    def summary(self) -> dict[str, Any]:
        """Totals and per-program counts: the `compile_cache` metrics record."""
        programs = dict(sorted(self.programs.items()))
        return {"hits": sum(p.hits for p in programs.values()),
                "misses": sum(p.misses for p in programs.values()),
                "compile_seconds": round(sum(p.seconds for p in programs.values()), 3),
                "programs": {name: {"hits": p.hits, "misses": p.misses, "seconds": round(p.seconds, 3)}
                             for name, p in programs.items()}}
