"""The TPU shape table: names, topologies, hosts and chips, and the rejection of anything else."""

import math

import pytest

from simpo_operator import tpu
from simpo_worker.contract.errors import ConfigError

# Independent facts from the GKE TPU docs: (accelerator type, topology, hosts, chips per host, machine type).
KNOWN = [
    ("v4-8", "2x2x1", 1, 4, "ct4p-hightpu-4t"),
    ("v4-32", "2x2x4", 4, 4, "ct4p-hightpu-4t"),
    ("v5litepod-1", "1x1", 1, 1, "ct5lp-hightpu-1t"),
    ("v5litepod-8", "2x4", 1, 8, "ct5lp-hightpu-8t"),
    ("v5litepod-16", "4x4", 4, 4, "ct5lp-hightpu-4t"),
    ("v5litepod-256", "16x16", 64, 4, "ct5lp-hightpu-4t"),
    ("v5p-8", "2x2x1", 1, 4, "ct5p-hightpu-4t"),
    ("v5p-32", "2x2x4", 4, 4, "ct5p-hightpu-4t"),
    ("v5p-128", "4x4x4", 16, 4, "ct5p-hightpu-4t"),
    ("v6e-4", "2x2", 1, 4, "ct6e-standard-4t"),
    ("v6e-16", "4x4", 4, 4, "ct6e-standard-4t"),
    ("v6e-256", "16x16", 64, 4, "ct6e-standard-4t"),
]


@pytest.mark.parametrize("name, topology, hosts, chips_per_host, machine", KNOWN)
def test_known_shapes(name, topology, hosts, chips_per_host, machine):
    shape = tpu.shape_for_type(name)
    assert (shape.topology, shape.hosts, shape.chips_per_host, shape.machine_type) == (
        topology, hosts, chips_per_host, machine)


@pytest.mark.parametrize("shape", tpu.SHAPES, ids=lambda s: s.accelerator_type)
def test_every_shape_is_consistent_both_ways(shape):
    assert shape.hosts * shape.chips_per_host == shape.chips == math.prod(map(int, shape.topology.split("x")))
    assert tpu.shape_for_type(shape.accelerator_type) == shape
    assert tpu.shape_for_topology(shape.gke_accelerator, shape.topology) == shape
    assert tpu.shape_for_topology(shape.generation, shape.topology) == shape


def test_every_generation_is_in_the_table():
    assert {s.generation for s in tpu.SHAPES} == {"v4", "v5e", "v5p", "v6e"}
    assert {s.gke_accelerator for s in tpu.SHAPES} == {"tpu-v4-podslice", "tpu-v5-lite-podslice", "tpu-v5p-slice",
                                                       "tpu-v6e-slice"}


def test_name_counts_tensorcores_for_v4_v5p_and_chips_for_v5e_v6e():
    assert tpu.shape_for_type("v5p-32").chips == 16
    assert tpu.shape_for_type("v4-16").chips == 8
    assert tpu.shape_for_type("v5e-16").chips == 16 == tpu.shape_for_type("v5litepod-16").chips
    assert tpu.shape_for_type("v6e-16").chips == 16


@pytest.mark.parametrize("name", ["v5p-33", "v5p-4", "v6e-2", "v7-8", "tpu", "v5litepod-12"])
def test_unknown_types_list_the_valid_ones(name):
    with pytest.raises(ConfigError) as error:
        tpu.shape_for_type(name, "spec.tpu.type")
    message = str(error.value)
    assert message.startswith(f"spec.tpu.type: unknown TPU type {name!r}; valid types: ")
    for valid in ("v4-8", "v5litepod-16", "v5p-32", "v6e-256"):
        assert valid in message


def test_impossible_topology_lists_the_generations_topologies():
    with pytest.raises(ConfigError, match=r"spec\.tpu\.topology: '2x2x2' is not a v6e slice topology; "
                                          r"valid topologies: 1x1, 2x2, 2x4, 4x4"):
        tpu.shape_for_topology("tpu-v6e-slice", "2x2x2", "spec.tpu")
    with pytest.raises(ConfigError, match=r"spec\.tpu\.topology: '3x3x3' is not a v5p"):
        tpu.shape_for_topology("v5p", "3x3x3", "spec.tpu")


def test_unknown_accelerator_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        tpu.shape_for_topology("tpu-v9-slice", "2x2", "spec.tpu")
    assert str(error.value).startswith("spec.tpu.accelerator: unknown TPU accelerator 'tpu-v9-slice'; valid "
                                       "accelerators: tpu-v4-podslice, tpu-v5-lite-podslice, tpu-v5p-slice, "
                                       "tpu-v6e-slice")
