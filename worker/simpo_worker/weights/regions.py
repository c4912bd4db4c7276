"""A global array streamed onto its sharding: each process reads only the regions its own devices hold, in
blocks, so host memory stays at one block however large the array (the sharded loading of HF weights).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

# Host memory a region read for from_regions may take at once (larger regions are read and written in blocks).
REGION_PIECE_BYTES = 32 << 20


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

