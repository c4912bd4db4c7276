"""An HF-format model directory read: config.json + safetensors weights (one file, sharded with an index, or
several *.safetensors), local or any fsspec URL (gs://...), into a `Llama`, whole or sharded.

Sharded loading (`load_hf_model(source, shardings)`): each process reads only the regions of the tensors its own
devices hold (weights.hf_tensors), in byte ranges of at most safetensors_file.READ_CHUNK_BYTES (one contiguous
byte range per chunk of rows).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec

from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.contract.errors import ModelError
from simpo_worker.model.llama import Llama
from simpo_worker.weights.hf_config import config_from_hf
from simpo_worker.weights.hf_tensors import llama_from_hf_tensors, sharded_llama_from_hf
from simpo_worker.weights.safetensors_file import SafetensorsFile

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _weight_files(fs: fsspec.AbstractFileSystem, root: str, source: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it: from the shard index if there is one, else every *.safetensors."""
    index_path = posixpath.join(root, INDEX_FILE)
    if fs.exists(index_path):
        weight_map = _read_json(fs, index_path, f"{source}/{INDEX_FILE}").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{source}/{INDEX_FILE}: no weight_map")
        file_names = sorted(set(weight_map.values()))
    else:
        file_names = sorted(posixpath.basename(p) for p in fs.glob(posixpath.join(root, "*.safetensors")))
        if not file_names:
            raise ModelError(f"{source}: missing weight file: no {WEIGHTS_FILE}, {INDEX_FILE} or *.safetensors")
    files = {}
    for file_name in file_names:
        path = posixpath.join(root, file_name)
        if not fs.exists(path):
            raise ModelError(f"{source}/{file_name}: missing weight file (listed in {INDEX_FILE})")
        files[file_name] = SafetensorsFile(fs, path, f"{source}/{file_name}")
    return {name: file for file in files.values() for name in file.tensors}


def _read_json(fs: fsspec.AbstractFileSystem, path: str, label: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{label}: not valid JSON: {error}") from error


# ---- public entry points ---------------------------------------------------------------------------------------


def is_hf_model_dir(source: str) -> bool:
    fs, root = fsspec.core.url_to_fs(source)
    return fs.exists(posixpath.join(root, CONFIG_FILE))


def load_hf_config(source: str) -> ArchitectureConfig:
    fs, root = fsspec.core.url_to_fs(source)
    path = posixpath.join(root, CONFIG_FILE)
    if not fs.exists(path):
        raise ModelError(f"{source}: not an HF checkpoint directory (no {CONFIG_FILE})")
    return config_from_hf(_read_json(fs, path, f"{source}/{CONFIG_FILE}"), f"{source}/{CONFIG_FILE}")


def load_hf_model(source: str, shardings: Llama | None = None) -> Llama:
    """A Llama from an HF directory (local path or fsspec URL) with config.json and safetensors weights.

    `shardings` (a Llama of NamedShardings: mesh.param_shardings): every param made on its sharding, this process
    reading only its devices' regions (module docstring). None: the whole model, on the default device."""
    config = load_hf_config(source)
    fs, root = fsspec.core.url_to_fs(source)
    files = _weight_files(fs, root, source)

    def file_of(name: str) -> SafetensorsFile:
        if name not in files:
            raise ModelError(f"{source}: tensor {name} is missing from the weight files "
                             f"({', '.join(sorted({f.label for f in files.values()}))})")
        return files[name]

    if shardings is not None:
        return sharded_llama_from_hf(
            config, lambda name, shape, index: file_of(name).read_region(name, shape, index), shardings)
    return llama_from_hf_tensors(config, lambda name, shape: file_of(name).read(name, shape))

