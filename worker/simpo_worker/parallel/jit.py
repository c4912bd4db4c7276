"""jax.jit with a count of its traces, for the no-recompilation checks (a trace precedes every compile).

    program = counted_jit(fn, static_argnames=("spec",), donate_argnames=("state",))
    program(...)           # as jax.jit(fn, ...)(...)
    program.compilations   # traces so far
    program.lower(...)     # the jitted function's own lower (e.g. on ShapeDtypeStructs, for another topology)
    program.fresh()        # the same program with a compile cache and count of its own

Every CountedJit jits its own wrapper of `fn`, so two of them never share a compile cache: each count covers
exactly the traces its own calls needed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax


class CountedJit:
    def __init__(self, fn: Callable, **jit_kwargs: Any):
        self.fn = fn
        self.jit_kwargs = jit_kwargs
        self.compilations = 0

        @functools.wraps(fn)  # jax reads the signature through __wrapped__ (static/donated argument names)
        def traced(*args, **kwargs):
            self.compilations += 1
            return fn(*args, **kwargs)

        self.jitted = jax.jit(traced, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def fresh(self) -> "CountedJit":
        return CountedJit(self.fn, **self.jit_kwargs)


def counted_jit(fn: Callable | None = None, **jit_kwargs: Any):
    """`counted_jit(fn, **jit_kwargs)`, or `@counted_jit(**jit_kwargs)` as a decorator."""
    if fn is None:
        return lambda f: CountedJit(f, **jit_kwargs)
    return CountedJit(fn, **jit_kwargs)
