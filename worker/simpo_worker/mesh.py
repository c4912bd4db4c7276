"""The device mesh and how training state and batches are laid out on it.

Axes: `data` (pure data parallel: replicated params), `fsdp` (data parallel with params and optimizer state
sharded: each array split on its largest dimension divisible by the axis size), `model` (reserved for tensor
parallelism: arrays are replicated over it for now). Batches split their pair axis over data x fsdp.
The mesh spans jax.devices(), i.e. every device of every process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.config import MeshConfig
from simpo_worker.errors import ConfigError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.resolve(len(devices))
    return Mesh(mesh_utils.create_device_mesh(shape, devices), AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest dimension divisible by the fsdp axis; replicate what cannot be split."""
    if fsdp_size == 1:
        return P()
    divisible = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if not divisible:
        return P()
    largest = max(divisible, key=lambda d: shape[d])
    return P(*[("fsdp" if d == largest else None) for d in range(len(shape))])


def state_shardings(arrays, mesh: Mesh):
    """NamedShardings for a pytree of arrays (params, optimizer state): FSDP over `fsdp`, replicated elsewhere."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh.shape["fsdp"])), arrays)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """For microbatched arrays [microbatches, pairs, ...]: pairs split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def host_rows(mesh: Mesh, microbatches: int, pairs_per_microbatch: int) -> slice:
    """The pairs of each microbatch that this process's devices hold (a contiguous range); the host reads only these."""
    shape = (microbatches, pairs_per_microbatch)
    indices = batch_sharding(mesh).addressable_devices_indices_map(shape).values()
    covered = sorted({index[1].indices(pairs_per_microbatch)[:2] for index in indices})
    start, stop = covered[0][0], covered[-1][1]
    if any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ConfigError(f"trainer.mesh: this process's devices hold non-contiguous batch rows {covered}")
    return slice(start, stop)


def place(arrays, shardings):
    """Put host arrays (identical on every process) onto their global shardings; works across processes."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
                        arrays, shardings)
