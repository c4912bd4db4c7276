"""TPU slice shapes on GKE: accelerator type + topology -> hosts per slice, chips per host, node labels.

Two ways to name a slice, as GCP does:
- an accelerator type: `v5p-32`, `v4-16`, `v5litepod-16` (alias `v5e-16`), `v6e-16`. v4 and v5p count
  TensorCores in the name (2 per chip: v5p-32 is 16 chips), v5e and v6e count chips;
- a GKE accelerator (`tpu-v5p-slice`, or just `v5p`) plus a topology (`2x2x4`).

Multi-host slices have 4 chips per host (one ct*-4t VM each); v5e/v6e also have single-host shapes of 1, 4 and 8
chips. Anything not in the table is rejected with the list of valid choices.

Each generation also carries its chip's published figures (HBM, peak bf16 FLOP/s, HBM bandwidth, with the page
they come from) for `simpo-interleave plan`'s roofline estimates, and the names libtpu's compile-only topologies
use for it (`libtpu_topology`), so a job is compiled for its slice on a machine without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simpo_worker.contract.errors import ConfigError

CHIPS_PER_MULTIHOST_VM = 4
# GKE's TPU node labels: a slice's pods select its node pool with both.
ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
GIB = 2**30


@dataclass(frozen=True)
class ChipFigures:
    """One chip's published figures, and the HBM the compiler lets one program use on it."""

    hbm_bytes: int  # published HBM capacity
    peak_bf16_flops: float  # published peak dense bf16 FLOP/s
    hbm_bytes_per_s: float  # published HBM bandwidth
    source: str  # the page the three published figures come from
    # What XLA lets a program use on one chip: libtpu's own out-of-memory message reports it as "available HBM"
    # (libtpu 0.0.42; the published capacity minus what the runtime keeps). The fit verdict is against this;
    # tests/local/test_plan.py checks it against the installed libtpu.
    compiler_hbm_bytes: int


@dataclass(frozen=True)
class Generation:
    name: str  # v5p
    gke_accelerator: str  # the node label value cloud.google.com/gke-tpu-accelerator
    type_prefixes: tuple[str, ...]  # accelerator-type prefixes; the first is the canonical one
    cores_per_chip_in_name: int  # what the number in the type name counts: 2 = TensorCores, 1 = chips
    machine_prefix: str  # ct5p-hightpu -> ct5p-hightpu-4t
    single_host_max_chips: int  # slices up to this size run on one VM holding every chip
    topologies: tuple[str, ...]
    chip: ChipFigures
    # libtpu's name for the generation in compile-only topologies ("v5e:4x4"), and its chip configuration:
    # "megacore" joins a v4/v5p chip's two TensorCores into one device, as on GKE.
    libtpu_name: str
    libtpu_chip_config: str


GENERATIONS = (
    Generation("v4", "tpu-v4-podslice", ("v4",), 2, "ct4p-hightpu", 4,
               ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12", "8x8x16",
                "8x16x16", "16x16x16"),
               # "HBM2 capacity and bandwidth: 32 GiB, 1200 GBps"; "Peak compute per chip: 275 teraflops (bf16)"
               ChipFigures(32 * GIB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4",
                           compiler_hbm_bytes=round(30.75 * GIB)),
               "v4", "megacore"),
    Generation("v5e", "tpu-v5-lite-podslice", ("v5litepod", "v5e"), 1, "ct5lp-hightpu", 8,
               ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
               # "Peak compute per chip (bf16): 197 TFLOPs"; "HBM2 capacity and bandwidth: 16 GB, 819 GBps"
               ChipFigures(16 * 10**9, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e",
                           compiler_hbm_bytes=round(15.75 * GIB)),
               "v5e", "default"),
    Generation("v5p", "tpu-v5p-slice", ("v5p",), 2, "ct5p-hightpu", 4,
               ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16",
                "16x16x16", "16x16x24"),
               # "Peak compute per chip (bf16): 459 TFLOPs"; "HBM2e capacity and bandwidth: 95 GB, 2765 GBps"
               ChipFigures(95 * 10**9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p",
                           compiler_hbm_bytes=round(95.74 * GIB)),
               "v5p", "megacore"),
    Generation("v6e", "tpu-v6e-slice", ("v6e",), 1, "ct6e-standard", 8,
               ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
               # "Peak compute per chip (bf16): 918 TFLOPs"; "HBM capacity per chip: 32 GB";
               # "HBM bandwidth per chip: 1638 GBps"
               ChipFigures(32 * 10**9, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e",
                           compiler_hbm_bytes=round(31.25 * GIB)),
               "v6e", "default"),
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


def generation(shape: TpuShape) -> Generation:
    return next(g for g in GENERATIONS if g.name == shape.generation)


@dataclass(frozen=True)
class LibtpuTopology:
    """The arguments of jax.experimental.topologies.get_topology_desc for a slice (or identical slices)."""

    topology_name: str  # v5p:2x2x4
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    num_slices: int


def host_block(shape: TpuShape) -> TpuShape:
    """The single-host slice made of one host's chips (2x2 of a multi-host slice): what a host-data-parallel
    replica runs on, as a slice of its own."""
    if shape.hosts == 1:
        return shape
    side = "2x2x1" if len(shape.topology.split("x")) == 3 else "2x2"
    return shape_for_topology(shape.generation, side)


def libtpu_topology(shape: TpuShape, slices: int = 1) -> LibtpuTopology:
    """How libtpu names `slices` x `shape` for a compile-only topology (devices numbered as on the real slice,
    with one process per host)."""
    gen = generation(shape)
    if shape.hosts == 1:
        # One VM holds the whole slice: its host bounds are the topology itself.
        sides = [int(side) for side in shape.topology.split("x")]
        bounds = tuple(sides + [1] * (3 - len(sides)))
    else:
        bounds = (2, 2, 1)  # a multi-host VM holds a 2x2 block of chips
    return LibtpuTopology(f"{gen.libtpu_name}:{shape.topology}", gen.libtpu_chip_config, bounds, slices)
