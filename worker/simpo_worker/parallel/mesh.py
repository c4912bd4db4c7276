"""The device mesh and how training state and batches are placed on it (the layout itself: model.layout).

The mesh spans jax.devices(), i.e. every device of every process. On a multislice job the slices are joined by
the data-center network, far slower than the links inside a slice: the slices split `data` alone (the hybrid
mesh of mesh_utils), so fsdp and model stay within a slice. Each weight is placed by model.layout.PARAM_AXES;
optimizer state follows its params; batches split their pair axis over data x fsdp.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.contract.config import ArchitectureConfig, MeshConfig
from simpo_worker.contract.errors import ConfigError
from simpo_worker.model.layout import AXES, BATCH_AXES, param_spec
from simpo_worker.model.llama import Llama, init_llama


def make_mesh(config: MeshConfig, devices: list | None = None, slices: int | None = None) -> Mesh:
    """The training mesh over `devices` (default: every device of every process) in `slices` slices (default:
    as the TPU devices' slice_index says; 1 off TPU). Multislice: the slices split `data` over the
    data-center network (DCN) and each slice holds data / slices x fsdp x model devices on its own links (ICI);
    MeshConfig.resolve refuses a mesh that would put fsdp or model across slices."""
    devices = jax.devices() if devices is None else devices
    on_tpu = devices[0].platform == "tpu"  # elsewhere slice_index is absent or 0 on every device
    found = len({getattr(device, "slice_index", 0) for device in devices}) if on_tpu else 1
    slices = found if slices is None else slices
    if on_tpu and slices != found:
        raise ConfigError(f"the job has {slices} slice(s) but the devices are in {found}: the multislice "
                          f"environment (MEGASCALE_*) is missing or wrong on this pod")
    shape = config.resolve(len(devices), slices=slices)
    if slices == 1:
        return Mesh(mesh_utils.create_device_mesh(shape, devices), AXES)
    within, across = (shape[0] // slices, *shape[1:]), (slices, 1, 1)
    if on_tpu:
        return Mesh(mesh_utils.create_hybrid_device_mesh(within, across, devices), AXES)
    # Off TPU devices carry no slice: a slice is a run of consecutive processes (process index //
    # hosts per slice, as jax.distributed numbers the pods: SIMPO_SLICE_INDEX * SIMPO_HOSTS_PER_SLICE + host).
    processes = len({device.process_index for device in devices})
    if processes % slices:
        raise ConfigError(f"{processes} processes do not split into {slices} slices of equal hosts")
    members = [[d for d in devices if d.process_index * slices // processes == s] for s in range(slices)]
    return Mesh(np.concatenate([mesh_utils.create_device_mesh(within, group) for group in members]), AXES)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree holding Llamas (the params, a TrainState, optimizer moments shaped like the
    params): each weight by PARAM_AXES; anything else (steps, counts) replicated. Leaves may be arrays or
    jax.ShapeDtypeStructs."""

    def shardings(node):
        if not isinstance(node, Llama):
            return NamedSharding(mesh, P())
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: NamedSharding(mesh, param_spec(path[-1].name, np.shape(leaf), node.config,
                                                              mesh.shape)), node)
    return jax.tree.map(shardings, tree, is_leaf=lambda node: isinstance(node, Llama))


def param_shardings(config: ArchitectureConfig, mesh: Mesh) -> Llama:
    """The params' NamedShardings (a Llama of them) for a model of `config`, from shapes alone."""
    return state_shardings(jax.eval_shape(lambda: init_llama(config, jax.random.key(0))), mesh)


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
