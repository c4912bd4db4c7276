"""A `Llama` written as an HF-format model directory, local or any fsspec URL, in transformers' layout: one
model.safetensors, or model-0000i-of-0000N.safetensors files of at most max_shard_bytes each plus
model.safetensors.index.json (written with the safetensors package), and config.json last.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import safetensors.numpy

from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.model.llama import Llama
from simpo_worker.store import storage
from simpo_worker.weights.hf_config import config_to_hf
from simpo_worker.weights.hf_load import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from simpo_worker.weights.hf_tensors import TensorPlace, hf_tensor, hf_tensor_places, hf_tensor_shapes

# transformers' save_pretrained default max_shard_size ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def save_hf_model(model: Llama, destination: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write a whole model held by this process to a local directory or fsspec URL (write_hf_model)."""
    write_hf_model(model.config, lambda name, place: hf_tensor(model, place), destination, max_shard_bytes)


def shard_plan(config: ArchitectureConfig, max_shard_bytes: int) -> list[list[str]]:
    """The tensor names of each safetensors file, split as transformers' save_pretrained splits: in order, a file
    takes tensors until the next would take it past max_shard_bytes (a larger tensor gets a file of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in hf_tensor_shapes(config).items():
        nbytes = math.prod(shape) * 4  # float32
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    return [WEIGHTS_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_hf_model(config: ArchitectureConfig, tensor: Callable[[str, TensorPlace], np.ndarray], destination: str,
                   max_shard_bytes: int, write: bool = True, extra_files: dict[str, bytes] | None = None) -> None:
    """An HF model directory at `destination` (local or fsspec URL): the safetensors files (float32, one
    safetensors file in memory at a time), their index if several, `extra_files` (the tokenizer's), config.json
    last, so a directory with config.json is complete. A previous copy's config.json goes first.

    `tensor(name, place)` gives each HF tensor in HF orientation; it is called for every tensor in the same order
    however `write` is set, so it may be a collective that every process joins; only with `write` is anything
    written (the leader of a multi-host job)."""
    places = hf_tensor_places(config)
    plan = shard_plan(config, max_shard_bytes)
    files = shard_file_names(len(plan))
    if write:
        _remove_previous_copy(destination)
    weight_map, total = {}, 0
    for file, names in zip(files, plan):
        tensors = {name: tensor(name, places[name]) for name in names}
        if write:
            # "format": "pt" is what transformers expects in the safetensors metadata.
            storage.write_atomic(storage.join(destination, file),
                                 safetensors.numpy.save(tensors, metadata={"format": "pt"}), "safetensors file")
        weight_map.update({name: file for name in names})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    if not write:
        return
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        storage.write_atomic(storage.join(destination, INDEX_FILE), json.dumps(index, indent=2) + "\n")
    for name, data in (extra_files or {}).items():
        storage.write_atomic(storage.join(destination, name), data)
    storage.write_atomic(storage.join(destination, CONFIG_FILE), json.dumps(config_to_hf(config), indent=2) + "\n")


def _remove_previous_copy(destination: str) -> None:
    """config.json first (the copy stops looking complete), then the weight files and index: a copy with another
    shard count would leave files the new index does not list."""
    storage.remove(storage.join(destination, CONFIG_FILE))
    for name in storage.list_names(destination):
        if name == INDEX_FILE or (name.startswith("model") and name.endswith(".safetensors")):
            storage.remove(storage.join(destination, name))
