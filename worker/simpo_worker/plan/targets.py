"""The devices a job runs on, described without them: a TPU slice as libtpu's compile-only topology (the `tpu`
extra), or this machine's CPU devices standing in for a CPU pool's hosts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Compile-only use of libtpu opens no TPU, so another process holding libtpu's lock (a test, a worker) must not
# stop it. Set before libtpu loads (when the first topology is made).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from simpo_worker.contract.errors import ConfigError  # noqa: E402


class TopologyUnavailable(RuntimeError):
    """libtpu cannot describe the slice (not installed, or a name it does not know)."""



@dataclass(frozen=True)
class Target:
    """The devices a job runs on: every device (all hosts, all slices, in jax.devices() order), the first
    host's (a host-data-parallel replica lives on them), and how many slices they are in."""

    platform: str
    devices: tuple
    host_devices: tuple
    process_count: int
    slices: int = 1


def _topology_devices(topology) -> tuple:
    from jax.experimental import topologies

    try:
        return tuple(topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name, chip_config_name=topology.chip_config_name,
            chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.num_slices).devices)
    except Exception as error:  # noqa: BLE001 - libtpu missing or the name unknown to it
        raise TopologyUnavailable(f"cannot describe TPU topology {topology.topology_name} x {topology.num_slices} "
                                  f"slice(s) ({type(error).__name__}: {error}); is the `tpu` extra (libtpu) "
                                  f"installed?") from error


def tpu_target(topology, host_topology=None) -> Target:
    """A TPU slice (or identical slices) as libtpu describes it, without one. `topology` and `host_topology` have
    get_topology_desc's arguments as attributes (simpo_operator.tpu.LibtpuTopology). `host_topology`: one host's
    chips as a single-host slice of their own, for the host-data-parallel programs (libtpu's compile-only path
    refuses collectives over one host's chips inside a larger v5e/v6e topology, whose device ids are not
    contiguous: 0, 1, 4, 5); default: the first host's devices of `topology`."""
    devices = _topology_devices(topology)
    first = devices[0].process_index
    host = (_topology_devices(host_topology) if host_topology is not None
            else tuple(d for d in devices if d.process_index == first))
    return Target("tpu", devices, host, len({d.process_index for d in devices}),
                  len({getattr(d, "slice_index", 0) for d in devices}))  # single slices may lack it


def cpu_target(hosts: int) -> Target:
    """A CPU pool of `hosts` hosts, one device each (as the worker sees them), stood in for by this machine's CPU
    devices: jax_num_cpu_devices must be >= hosts before JAX starts."""
    devices = jax.devices("cpu")
    if len(devices) < hosts:
        raise ConfigError(f"{hosts} CPU hosts need {hosts} local CPU devices, JAX has {len(devices)}; set "
                          f"jax_num_cpu_devices before JAX starts")
    return Target("cpu", tuple(devices[:hosts]), tuple(devices[:1]), hosts)

