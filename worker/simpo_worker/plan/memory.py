"""A lowered program compiled for its target, and its memory per chip accounted (a ProgramReport): from its
arguments' shapes and shardings, XLA's memory analysis, and, when XLA refuses it for lack of memory, the need
XLA's message states.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from simpo_worker.contract.errors import is_out_of_memory
from simpo_worker.plan.hlo import collectives
from simpo_worker.plan.report import ProgramReport


class CompileFailed(RuntimeError):
    """XLA failed to compile a program for a reason other than memory: plan cannot give a verdict."""


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
# XLA's two wordings of a program that does not fit (sizes in its binary units: 95.74G = 95.74 GiB).
_NEED_PATTERNS = (re.compile(r"\(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)"),
                  re.compile(r"Used ([\d.]+)([KMGTP]?) of ([\d.]+)([KMGTP]?) hbm"))


def out_of_memory_need(message: str) -> Optional[tuple[int, int]]:
    """(needed, available) bytes from XLA's out-of-memory message; None if it says neither."""
    for pattern in _NEED_PATTERNS:
        match = pattern.search(message)
        if match:
            need, need_unit, have, have_unit = match.groups()
            return round(float(need) * _UNITS[need_unit]), round(float(have) * _UNITS[have_unit])
    return None


def _compile(name: str, lowered):
    """(compiled or None, seconds, refusal message or None)."""
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - jax raises JaxRuntimeError
        if not is_out_of_memory(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompileFailed(f"{name}: XLA could not compile it for this target: {first}") from error
        return None, time.perf_counter() - started, str(error).strip()
    return compiled, time.perf_counter() - started, None


def report_program(name: str, lowered, *, params: int, optimizer: int, kv_args: int, flop_count: float,
            kv_out: Callable[[Any], int] = lambda output_shardings: 0,
            resident: tuple[int, int] = (0, 0)) -> tuple[ProgramReport, Any]:
    """Compile `lowered` and account its memory per chip. `kv_out(output shardings, or None if XLA refused)`: the
    KV cache bytes among its outputs; `resident` = (params, optimizer) bytes that live on the chip beside the
    program without being its arguments."""
    compiled, seconds, refused = _compile(name, lowered)
    if compiled is None:
        # XLA states the program's whole need (arguments, outputs and temporaries together).
        need = out_of_memory_need(refused)
        rest = max(0, need[0] - params - optimizer - kv_args) if need else 0
        report = ProgramReport(name, params + resident[0], optimizer + resident[1], 0, kv_args, 0, rest, 0,
                               flop_count, None, seconds, refused,
                               ["XLA refused to compile it for lack of memory: temporaries is the rest of XLA's "
                                "stated need (temporaries, outputs and the other inputs)"])
        return report, None
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cache_out = kv_out(compiled.output_shardings)
    inputs = max(0, memory.argument_size_in_bytes - params - optimizer - kv_args)
    outputs = max(0, memory.output_size_in_bytes - memory.alias_size_in_bytes - cache_out)
    report = ProgramReport(name, params + resident[0], optimizer + resident[1], inputs, kv_args + cache_out,
                           outputs, memory.temp_size_in_bytes, memory.generated_code_size_in_bytes, flop_count,
                           (cost or {}).get("flops"), seconds)
    for collective in collectives(compiled.as_text()):
        moved = collective.bytes * collective.count
        if collective.network == "dcn":
            report.dcn_bytes += moved
        else:
            report.ici_bytes += moved
    return report, compiled

