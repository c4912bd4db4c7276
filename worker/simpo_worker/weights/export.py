"""Hugging Face copies of the live policy (`export`): a directory transformers' LlamaForCausalLM.from_pretrained
loads, and so does `model.source`.

Where: the end's copy in `export.hf_dir` itself, a pause's in `<hf_dir>/step_<N>` (as HF's Trainer keeps its
checkpoints beside the final model). What: config.json, the weights in float32 safetensors (weights.hf_save: names,
orientation and sharding as transformers writes them) and the tokenizer's files.

Every host joins every gather; only the leader writes. The params are sharded over the training mesh, across hosts:
each HF tensor is gathered on its own (one layer of a stacked field; rows of at most GATHER_PIECE_BYTES at a time
for the large ones, e.g. the embedding), with process_allgather into host memory, so no device ever holds more
than one such piece beyond its own share, and the leader's host memory holds one safetensors file (twice: its
tensors and their serialized bytes) at most.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time

import jax
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from simpo_worker.contract.config import SMOLLM2, ExportConfig
from simpo_worker.model.llama import Llama
from simpo_worker.parallel.distributed import barrier, is_leader
from simpo_worker.store import storage
from simpo_worker.weights.hf_save import write_hf_model
from simpo_worker.weights.hf_tensors import TensorPlace, to_hf_orientation

log = logging.getLogger(__name__)

GATHER_PIECE_BYTES = 256 << 20
# The files an HF tokenizer directory may hold, copied as they are when there.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json")

_slice = jax.jit(lax.dynamic_slice, static_argnames="slice_sizes")


def export_dir(config: ExportConfig, step: int | None) -> str:
    """The end's copy (step None) in hf_dir, a pause's in hf_dir/step_<N>."""
    return config.hf_dir if step is None else storage.join(config.hf_dir, f"step_{step}")


def export_hf(model: Llama, destination: str, config: ExportConfig, tokenizer_files: dict[str, bytes],
              barrier_timeout_s: float) -> None:
    """Write `model` (the live, sharded params) as an HF model directory; complete for everyone when this returns
    (every process calls it)."""
    started = time.perf_counter()
    write_hf_model(model.config, lambda name, place: gather_tensor(place.of(model), place), destination,
                   config.max_shard_mb * 10**6, write=is_leader(), extra_files=tokenizer_files)
    barrier("export-" + re.sub(r"[^A-Za-z0-9_.-]", "_", destination), barrier_timeout_s)
    log.info("exported the policy to %s in %.1fs", destination, time.perf_counter() - started)


def gather_tensor(array: jax.Array, place: TensorPlace) -> np.ndarray:
    """One HF tensor (the layer `place.layer` of a stacked array) in host memory on every process, in HF
    orientation: sliced on the devices, rows of at most GATHER_PIECE_BYTES at a time, each gathered with
    process_allgather (a collective: every process calls this for the same tensors in the same order)."""
    shape = array.shape if place.layer is None else array.shape[1:]
    row_bytes = math.prod(shape[1:]) * array.dtype.itemsize
    rows_per_piece = max(1, GATHER_PIECE_BYTES // row_bytes)
    out = np.empty(shape, np.float32)
    for start in range(0, shape[0], rows_per_piece):
        rows = min(rows_per_piece, shape[0] - start)
        starts, sizes = (start, *[0] * (len(shape) - 1)), (rows, *shape[1:])
        if place.layer is not None:
            starts, sizes = (place.layer, *starts), (1, *sizes)
        piece = multihost_utils.process_allgather(_slice(array, starts, slice_sizes=sizes), tiled=True)
        out[start:start + rows] = np.asarray(piece).reshape(rows, *shape[1:])
    return to_hf_orientation(out, place)


def tokenizer_files(source: str, tokenizer) -> dict[str, bytes]:
    """The tokenizer's files for the copy. An HF tokenizer directory's are copied as they are. A GGUF's tokenizer
    is written as the `tokenizers.Tokenizer` the worker built from the GGUF metadata (tokenizer.json) with
    tokenizer_config.json (chat template and special tokens)."""
    if source == SMOLLM2 or source.endswith(".gguf"):
        return {"tokenizer.json": tokenizer.backend.to_str().encode(),
                "tokenizer_config.json": (json.dumps(_tokenizer_config(tokenizer), indent=2) + "\n").encode()}
    base = source.rstrip("/").removesuffix("/tokenizer.json")
    return {name: storage.read_bytes(storage.join(base, name), "tokenizer file") for name in HF_TOKENIZER_FILES
            if storage.exists(storage.join(base, name))}


def _tokenizer_config(tokenizer) -> dict:
    names = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.eos_token_id,
             "pad_token": tokenizer.pad_token_id}
    config = {name: tokenizer.backend.id_to_token(i) for name, i in names.items() if i is not None}
    config["add_bos_token"] = tokenizer.add_bos
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template.template
    return config
