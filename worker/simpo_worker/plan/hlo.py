"""The collectives of a compiled program, read from its HLO text: what one call sends per chip over ICI (inside a
slice) and over DCN (between slices), each with how often it runs (its loops' trip counts).

For a mesh over several slices libtpu compiles one SPMD program per slice: its collectives (replica groups of
the slice's own devices) run on the slice's links (ICI), and what crosses slices (the data-center network, DCN)
is sent to the multislice runtime as host transfers (`send`, is_host_transfer, with
_xla_megascale_transfer_type naming the collective: ALL_REDUCE, ALL_GATHER, ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

_ICI_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclass(frozen=True)
class Collective:
    """One collective of a compiled program, per chip: `network` "ici" or "dcn"; `kind` the HLO op (ICI) or the
    multislice transfer type (DCN); `bytes` what its result holds (an all-gather's gathered arrays, an
    all-reduce's operands; dtype and shape: its largest array); `count` how many times one call of the program
    runs it (its loops' trip counts)."""

    network: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    count: int
    replica_groups: Optional[str]


def _arrays(hlo_type: str) -> list[tuple[str, tuple[int, ...], int]]:
    found = []
    for dtype, dims in _ARRAY.findall(hlo_type):
        if dtype in _DTYPE_BYTES:
            shape = tuple(int(d) for d in dims.split(",") if d)
            found.append((dtype, shape, math.prod(shape) * _DTYPE_BYTES[dtype]))
    return found


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled program's HLO text (Compiled.as_text()), each with how often it runs."""
    computations: dict[str, list[tuple[str, str, str]]] = {}  # name -> its instructions' (type, op, rest)
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            current = computations.setdefault(head.group(1), [])
            entry = head.group(1) if line.startswith("ENTRY") else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            current.append(instruction.groups()[1:])
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    counts: dict[str, int] = {}

    def visit(name: str, count: int) -> None:
        counts[name] = counts.get(name, 0) + count
        for hlo_type, op, rest in computations[name]:
            called = _CALLED.findall(rest) + [c.strip().lstrip("%") for m in _BRANCHES.findall(rest)
                                               for c in m.split(",") if c.strip()]
            body = re.search(r"\bbody=%([\w.-]+)", rest) if op == "while" else None
            for callee in called:
                if callee in computations:
                    visit(callee, count * (_trip_count(computations, rest) if body and callee == body.group(1)
                                           else 1))

    visit(entry, 1)
    found = []
    for name, count in counts.items():
        for hlo_type, op, rest in computations[name]:
            transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest)
            if op == "send" and transfer:
                dtype, shape, size = _arrays(hlo_type)[0]  # (data, context, token)
                found.append(Collective("dcn", transfer.group(1), dtype, shape, size, count, None))
            elif op.removesuffix("-start") in _ICI_OPS:
                arrays = _arrays(hlo_type)
                # A combined collective's result is a tuple of its arrays; an asynchronous start's holds its
                # input and output (and context), of which the largest is what it moves.
                dtype, shape, size = max(arrays, key=lambda array: array[2])
                size = size if op.endswith("-start") else sum(array[2] for array in arrays)
                groups = re.search(r"replica_groups=(\{[{}\d,]*\}|\[[^ ]*)", rest)
                found.append(Collective("ici", op.removesuffix("-start"), dtype, shape, size, count,
                                        groups.group(1) if groups else None))
    return found


def _trip_count(computations, while_rest: str) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the bound its condition compares the counter
    with (jax's scans and fori_loops count from 0 while i < N); 1 for a loop without one bound (the decode loop
    runs until its rows are done: its collectives are counted per iteration)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_rest)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.-]+)", while_rest).group(1)
    bounds = {int(m) for _, op, rest in computations[condition] if op == "constant"
              for m in re.findall(r"^(-?\d+)\)", rest)}
    return bounds.pop() if len(bounds) == 1 else 1

