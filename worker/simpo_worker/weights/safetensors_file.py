"""A .safetensors file read tensor by tensor, or a region of one tensor, in byte ranges.

Our own small reader: the safetensors package's numpy backend has no bfloat16 (the dtype of most published
checkpoints), and byte-range reads keep host memory flat and work the same over gcsfs as on a local disk.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import fsspec
import jax.numpy as jnp
import numpy as np

from simpo_worker.contract.errors import ModelError

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
# Largest single byte-range read of a sharded load (rows of a stored matrix at a time).
READ_CHUNK_BYTES = 32 << 20


class SafetensorsFile:
    """One .safetensors file: the header is read (and checked against the file size) up front, tensors on demand."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, label: str):
        self.fs, self.path, self.label = fs, path, label
        size = fs.size(path)
        if size < 8:
            raise ModelError(f"{label}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", fs.cat_file(path, start=0, end=8))
        if 8 + header_len > size:
            raise ModelError(f"{label}: truncated safetensors file: header needs {8 + header_len} bytes, "
                             f"the file has {size}")
        try:
            header = json.loads(fs.cat_file(path, start=8, end=8 + header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{label}: not a safetensors file (bad header: {error})") from error
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.tensors: dict[str, dict[str, Any]] = header
        for name, info in header.items():
            end = info["data_offsets"][1]
            if self.data_start + end > size:
                raise ModelError(f"{label}: truncated safetensors file: tensor {name} ends at byte "
                                 f"{self.data_start + end}, the file has {size} bytes")

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype, start = self._check(name, shape)
        data = self.fs.cat_file(self.path, start=start, end=start + math.prod(shape) * np.dtype(dtype).itemsize)
        return np.frombuffer(data, dtype).reshape(shape).astype(np.float32)

    def read_region(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """Rows index[0] (and columns index[1]) of a 1-D or 2-D tensor, as float32: whole rows read in byte
        ranges of at most READ_CHUNK_BYTES, each cut to the columns."""
        dtype, start = self._check(name, shape)
        itemsize = np.dtype(dtype).itemsize
        rows = range(*index[0].indices(shape[0]))
        columns = index[1] if len(shape) == 2 else slice(None)
        width = shape[1] if len(shape) == 2 else 1
        out = np.empty((len(rows), *([len(range(*columns.indices(width)))] if len(shape) == 2 else [])), np.float32)
        chunk = max(1, READ_CHUNK_BYTES // (width * itemsize))
        for first in range(0, len(rows), chunk):
            a, b = rows.start + first, rows.start + min(first + chunk, len(rows))
            data = self.fs.cat_file(self.path, start=start + a * width * itemsize, end=start + b * width * itemsize)
            block = np.frombuffer(data, dtype)
            out[first:first + b - a] = block.reshape(b - a, width)[:, columns] if len(shape) == 2 else block
        return out

    def _check(self, name: str, shape: tuple[int, ...]) -> tuple[Any, int]:
        """The tensor's numpy dtype and first byte, after checking its shape and dtype."""
        info = self.tensors[name]
        if tuple(info["shape"]) != tuple(shape):
            raise ModelError(f"{self.label}: tensor {name} has shape {list(info['shape'])}, "
                             f"the config implies {list(shape)}")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"{self.label}: tensor {name} has dtype {info['dtype']}, "
                             f"supported: {', '.join(SAFETENSORS_DTYPES)}")
        return dtype, self.data_start + info["data_offsets"][0]

