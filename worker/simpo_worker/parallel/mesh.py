"""The device mesh and how training state and batches are laid out on it.

Axes: `data` (pure data parallel: replicated params), `fsdp` (data parallel with params and optimizer state
sharded on the model width d), `model` (tensor parallelism, Megatron style: attention heads, MLP hidden units and
the vocabulary split over it). Which dimension of which weight goes where is declared once, in PARAM_AXES and
RULES below; optimizer state follows its params. Batches split their pair axis over data x fsdp.
The mesh spans jax.devices(), i.e. every device of every process. On a multislice job the slices are joined by
the data-center network, far slower than the links inside a slice: the slices split `data` alone (the hybrid
mesh of mesh_utils), so fsdp and model stay within a slice.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.config import ArchitectureConfig, MeshConfig
from simpo_worker.errors import ConfigError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Host memory a region read for from_regions may take at once (larger regions are read and written in blocks).
REGION_PIECE_BYTES = 32 << 20


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


# ---- the layout of every weight, in one place -------------------------------------------------------------
#
# As in the JAX team's single-file Llama examples: each dimension of each weight has a logical name, and RULES says
# which mesh axis splits that name. Megatron tensor parallelism over `model`: q/k/v are split by attention head
# (columns) and wo by head (rows), so attention runs head-local and wo's partial sums meet in one all-reduce; the
# same for the MLP (gate/up by hidden unit, w_down by hidden unit) and for the vocabulary (embedding rows, head
# columns: logits come out split by vocab). FSDP over `fsdp`: the model width d, in every matrix. A dimension is
# split only in whole units (a head, not part of one) that the axis size divides; otherwise it stays whole on that
# axis (replicated). Axes absent from a mesh (a host's local inference mesh has no `fsdp`) split nothing.

LAYERS, EMBED, HEADS, KV_HEADS, FFN, VOCAB, NORM = "layers", "embed", "heads", "kv_heads", "ffn", "vocab", "norm"

RULES = {EMBED: "fsdp", HEADS: "model", KV_HEADS: "model", FFN: "model", VOCAB: "model", LAYERS: None,
         NORM: None}

# Weight (the Llama / DecoderLayers field) -> the logical name of each dimension. DecoderLayers fields are stacked
# on a leading LAYERS axis in the model; the decode programs hold them per layer (without it).
PARAM_AXES = {
    "embed": (VOCAB, EMBED),       # [V, d]
    "attn_norm": (NORM,),          # [d]
    "wq": (EMBED, HEADS),          # [d, heads * head_dim]
    "wk": (EMBED, KV_HEADS),       # [d, kv_heads * head_dim]
    "wv": (EMBED, KV_HEADS),       # [d, kv_heads * head_dim]
    "wo": (HEADS, EMBED),          # [heads * head_dim, d]
    "mlp_norm": (NORM,),           # [d]
    "w_gate": (EMBED, FFN),        # [d, f]
    "w_up": (EMBED, FFN),          # [d, f]
    "w_down": (FFN, EMBED),        # [f, d]
    "final_norm": (NORM,),         # [d]
    "lm_head": (EMBED, VOCAB),     # [d, V] (decode's head is this, or the tied embedding transposed: same layout)
}


def logical_axis(logical: str, units: int, mesh_shape) -> str | None:
    """The mesh axis that splits a dimension of `units` whole units (heads, or elements), or None."""
    axis = RULES[logical]
    size = mesh_shape.get(axis, 1) if axis is not None else 1
    return axis if size > 1 and units % size == 0 else None


def param_spec(name: str, shape: tuple[int, ...], config: ArchitectureConfig, mesh_shape) -> P:
    """The PartitionSpec of weight `name` (a PARAM_AXES key) of `shape`, stacked on a layer axis or not."""
    axes = PARAM_AXES[name]
    axes = (LAYERS,) * (len(shape) - len(axes)) + axes
    units = {HEADS: config.num_heads, KV_HEADS: config.num_kv_heads}
    return P(*[logical_axis(logical, units.get(logical, size), mesh_shape) for logical, size in zip(axes, shape)])


def kv_heads_axis(config: ArchitectureConfig, mesh_shape) -> str | None:
    """The mesh axis that splits the KV heads (of the decode programs' KV cache), or None."""
    return logical_axis(KV_HEADS, config.num_kv_heads, mesh_shape)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree holding Llamas (the params, a TrainState, optimizer moments shaped like the
    params): each weight by PARAM_AXES; anything else (steps, counts) replicated. Leaves may be arrays or
    jax.ShapeDtypeStructs."""
    from simpo_worker.model import Llama  # model.py imports this module (activation layouts)

    def shardings(node):
        if not isinstance(node, Llama):
            return NamedSharding(mesh, P())
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: NamedSharding(mesh, param_spec(path[-1].name, np.shape(leaf), node.config,
                                                              mesh.shape)), node)
    return jax.tree.map(shardings, tree, is_leaf=lambda node: isinstance(node, Llama))


def param_shardings(config: ArchitectureConfig, mesh: Mesh) -> Llama:
    """The params' NamedShardings (a Llama of them) for a model of `config`, from shapes alone."""
    from simpo_worker.model import init_llama

    return state_shardings(jax.eval_shape(lambda: init_llama(config, jax.random.key(0))), mesh)


def constrain_batch(x):
    """An activation [batch, ...] with its batch split over the data-parallel axes and every other dimension whole
    on the mesh the program is traced for (the train step sets it with jax.sharding.use_abstract_mesh); x as it is
    when none is set. Without it the partitioner may follow the weights' `fsdp`-split width into the activations
    and run every data-parallel device on the whole batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    batch = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, P(batch, *[None] * (x.ndim - 1)))


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


def from_regions(shape: tuple[int, ...], dtype, sharding: NamedSharding,
                 read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array made directly on `sharding`: `read(index)` gives a region (a tuple of slices) of what this
    process's devices hold. Every process calls it and reads only its own regions. Host memory holds at most
    REGION_PIECE_BYTES of them at a time: a larger region is read a block of its leading dimension at a time and
    written into its device buffer in place (devices holding the same region share each read)."""
    devices_of: dict[tuple, list] = {}
    index_map = sharding.addressable_devices_indices_map(shape)
    for device, index in index_map.items():
        devices_of.setdefault(tuple(s.indices(n)[:2] for s, n in zip(index, shape)), []).append(device)
    buffers = {}
    itemsize = np.dtype(dtype).itemsize
    for region, devices in devices_of.items():
        local = tuple(stop - start for start, stop in region)
        rest = tuple(slice(start, stop) for start, stop in region[1:])
        if not local or math.prod(local) * itemsize <= REGION_PIECE_BYTES:
            data = np.asarray(read(tuple(slice(start, stop) for start, stop in region)), dtype)
            buffers.update({device: jax.device_put(data, device) for device in devices})
            continue
        block = max(1, REGION_PIECE_BYTES // (math.prod(local[1:]) * itemsize))
        buffers.update({device: jnp.zeros(local, dtype, device=device) for device in devices})
        start, stop = region[0]
        for first in range(start, stop, block):
            piece = np.asarray(read((slice(first, min(first + block, stop)), *rest)), dtype)
            for device in devices:
                buffers[device] = _write_rows(buffers[device], jax.device_put(piece, device), first - start)
            # Wait for the writes: with asynchronous dispatch, reads could run ahead and queue pieces in memory.
            jax.block_until_ready([buffers[device] for device in devices])
            del piece
    return jax.make_array_from_single_device_arrays(shape, sharding, [buffers[device] for device in index_map])


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer: jax.Array, rows: jax.Array, start) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def place(arrays, shardings):
    """Put host arrays (identical on every process) onto their global shardings; works across processes."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
                        arrays, shardings)
