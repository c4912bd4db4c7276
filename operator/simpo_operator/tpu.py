"""TPU slice shapes on GKE: accelerator type + topology -> hosts per slice, chips per host, node labels.

Two ways to name a slice, as GCP does:
- an accelerator type: `v5p-32`, `v4-16`, `v5litepod-16` (alias `v5e-16`), `v6e-16`. v4 and v5p count
  TensorCores in the name (2 per chip: v5p-32 is 16 chips), v5e and v6e count chips;
- a GKE accelerator (`tpu-v5p-slice`, or just `v5p`) plus a topology (`2x2x4`).

Multi-host slices have 4 chips per host (one ct*-4t VM each); v5e/v6e also have single-host shapes of 1, 4 and 8
chips. Anything not in the table is rejected with the list of valid choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simpo_worker.errors import ConfigError

CHIPS_PER_MULTIHOST_VM = 4


@dataclass(frozen=True)
class Generation:
    name: str  # v5p
    gke_accelerator: str  # the node label value cloud.google.com/gke-tpu-accelerator
    type_prefixes: tuple[str, ...]  # accelerator-type prefixes; the first is the canonical one
    cores_per_chip_in_name: int  # what the number in the type name counts: 2 = TensorCores, 1 = chips
    machine_prefix: str  # ct5p-hightpu -> ct5p-hightpu-4t
    single_host_max_chips: int  # slices up to this size run on one VM holding every chip
    topologies: tuple[str, ...]


GENERATIONS = (
    Generation("v4", "tpu-v4-podslice", ("v4",), 2, "ct4p-hightpu", 4,
               ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12", "8x8x16",
                "8x16x16", "16x16x16")),
    Generation("v5e", "tpu-v5-lite-podslice", ("v5litepod", "v5e"), 1, "ct5lp-hightpu", 8,
               ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    Generation("v5p", "tpu-v5p-slice", ("v5p",), 2, "ct5p-hightpu", 4,
               ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16",
                "16x16x16", "16x16x24")),
    Generation("v6e", "tpu-v6e-slice", ("v6e",), 1, "ct6e-standard", 8,
               ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
)


@dataclass(frozen=True)
class TpuShape:
    generation: str
    gke_accelerator: str
    topology: str
    chips: int
    hosts: int
    chips_per_host: int
    machine_type: str
    accelerator_type: str  # canonical GCP name, e.g. v5p-32


def _shape(generation: Generation, topology: str) -> TpuShape:
    chips = math.prod(int(side) for side in topology.split("x"))
    chips_per_host = chips if chips <= generation.single_host_max_chips else CHIPS_PER_MULTIHOST_VM
    return TpuShape(
        generation=generation.name,
        gke_accelerator=generation.gke_accelerator,
        topology=topology,
        chips=chips,
        hosts=chips // chips_per_host,
        chips_per_host=chips_per_host,
        machine_type=f"{generation.machine_prefix}-{chips_per_host}t",
        accelerator_type=f"{generation.type_prefixes[0]}-{chips * generation.cores_per_chip_in_name}",
    )


SHAPES = tuple(_shape(generation, topology) for generation in GENERATIONS for topology in generation.topologies)
_BY_TYPE = {f"{prefix}-{shape.accelerator_type.rsplit('-', 1)[1]}": shape
            for generation in GENERATIONS for prefix in generation.type_prefixes
            for shape in SHAPES if shape.generation == generation.name}
_BY_ACCELERATOR = {alias: generation for generation in GENERATIONS
                   for alias in (generation.gke_accelerator, generation.name)}

VALID_TYPES = tuple(shape.accelerator_type for shape in SHAPES)
VALID_ACCELERATORS = tuple(generation.gke_accelerator for generation in GENERATIONS)


def shape_for_type(accelerator_type: str, path: str = "tpu.type") -> TpuShape:
    """`v5p-32` -> its shape; unknown names raise ConfigError listing the valid ones."""
    shape = _BY_TYPE.get(accelerator_type.strip().lower())
    if shape is None:
        raise ConfigError(f"{path}: unknown TPU type {accelerator_type!r}; valid types: {', '.join(VALID_TYPES)} "
                          f"(v5e also as v5e-N)")
    return shape


def shape_for_topology(accelerator: str, topology: str, path: str = "tpu") -> TpuShape:
    """GKE accelerator (or generation name) + topology -> shape; impossible combinations are rejected."""
    generation = _BY_ACCELERATOR.get(accelerator.strip().lower())
    if generation is None:
        raise ConfigError(f"{path}.accelerator: unknown TPU accelerator {accelerator!r}; valid accelerators: "
                          f"{', '.join(VALID_ACCELERATORS)} (or the generation: "
                          f"{', '.join(g.name for g in GENERATIONS)})")
    if topology not in generation.topologies:
        raise ConfigError(f"{path}.topology: {topology!r} is not a {generation.name} slice topology; valid "
                          f"topologies: {', '.join(generation.topologies)}")
    return next(shape for shape in SHAPES if shape.generation == generation.name and shape.topology == topology)
