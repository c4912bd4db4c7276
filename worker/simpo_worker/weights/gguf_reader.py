"""GGUF Llama weights (llama.cpp's format), read and dequantized with the `gguf` package.

GGUF tensor names map onto HF names, and the tensors are handed to the HF assembler in HF orientation ([out, in]:
a GGUF shape [ne0, ne1] is numpy [ne1, ne0]). Two GGUF quirks are undone here:
- llama.cpp's HF->GGUF converter permutes the rows of q/k projections, per head, from HF's rotate-half rotary
  layout to its interleaved one (pairs (2i, 2i+1) instead of (i, i + hd/2)). We apply the inverse permutation.
- A tied output head is stored once, as token_embd.weight (no output.weight).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from simpo_worker.contract import schema
from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.contract.errors import ConfigError, ModelError
from simpo_worker.model.llama import Llama
from simpo_worker.weights.hf_tensors import EMBED, FINAL_NORM, LAYER_TENSORS, LM_HEAD, llama_from_hf_tensors

Q = GGMLQuantizationType
# Float types and the block quantizations gguf.quants dequantizes in numpy (those llama.cpp uses for Llama files).
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# DecoderLayers field -> GGUF tensor name inside `blk.{i}.`.
GGUF_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
GGUF_EMBED, GGUF_FINAL_NORM, GGUF_OUTPUT = "token_embd.weight", "output_norm.weight", "output.weight"


def gguf_tensor_names(num_layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name."""
    names = {EMBED: GGUF_EMBED, FINAL_NORM: GGUF_FINAL_NORM, LM_HEAD: GGUF_OUTPUT}
    for i in range(num_layers):
        for field, hf_suffix in LAYER_TENSORS.items():
            names[f"model.layers.{i}.{hf_suffix}"] = f"blk.{i}.{GGUF_LAYER_TENSORS[field]}"
    return names


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation: per head, rows (pair i, member j) go back to (member j, pair i)."""
    out_dim = weight.shape[0]
    return (weight.reshape(heads, out_dim // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: GGUFReader, where: str) -> ArchitectureConfig:
    """Llama architecture metadata (`llama.*` keys) -> ArchitectureConfig."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{where}: unsupported architecture: general.architecture is {arch!r}; "
                         f"only 'llama' is supported")

    def required(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ModelError(f"{where}: metadata key llama.{key} is missing")
        return value

    tensors = {t.name for t in reader.tensors}
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise ModelError(f"{where}: rope scaling in GGUF (llama.rope.scaling.type {scaling!r} / rope_freqs.weight) "
                         f"is not supported; load the HF checkpoint instead")
    hidden, heads = required("embedding_length"), required("attention.head_count")
    head_dim = _field(reader, "llama.attention.key_length", hidden // heads)
    rotary_dim = _field(reader, "llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ModelError(f"{where}: partial rotary embeddings (llama.rope.dimension_count {rotary_dim} != head dim "
                         f"{head_dim}) are not supported")
    embed = next((t for t in reader.tensors if t.name == GGUF_EMBED), None)
    vocab = _field(reader, "llama.vocab_size", None if embed is None else int(embed.shape[1]))
    if vocab is None:
        raise ModelError(f"{where}: cannot tell the vocab size (no llama.vocab_size, no {GGUF_EMBED})")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config = ArchitectureConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=None if head_dim == hidden // heads else int(head_dim),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(required("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=GGUF_OUTPUT not in tensors,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
    )
    try:
        schema.validate(config, where)
    except ConfigError as error:
        raise ModelError(str(error)) from error
    return config


def dequantize_tensor(tensor: ReaderTensor, where: str) -> np.ndarray:
    """float32, numpy [ne1, ne0] (= HF [out, in]); always a copy, never a view of the memory-mapped file."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise ModelError(f"{where}: tensor {tensor.name} uses GGUF type {tensor.tensor_type.name}, which is not "
                         f"supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    return np.array(dequantize(tensor.data, tensor.tensor_type), np.float32)


def open_gguf(path: str, label: str) -> GGUFReader:
    try:
        return GGUFReader(path)
    # The reader fails with ValueError (bad magic, or a tensor's data cut short) or IndexError (metadata cut short).
    except (ValueError, IndexError) as error:
        size = Path(path).stat().st_size
        raise ModelError(f"{label}: not a readable GGUF file (truncated or corrupt; {size} bytes): the gguf reader "
                         f"failed with: {error}") from error


def llama_from_gguf_reader(reader: GGUFReader, where: str) -> Llama:
    config = config_from_gguf(reader, where)
    tensors = {t.name: t for t in reader.tensors}
    names = gguf_tensor_names(config.num_layers)
    q_names = {f"blk.{i}.attn_q.weight" for i in range(config.num_layers)}
    k_names = {f"blk.{i}.attn_k.weight" for i in range(config.num_layers)}

    def read(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        name = names[hf_name]
        if name not in tensors:
            raise ModelError(f"{where}: tensor {name} is missing")
        tensor = tensors[name]
        gguf_shape = tuple(int(n) for n in reversed(tensor.shape))
        if gguf_shape != shape:
            raise ModelError(f"{where}: tensor {name} has shape {list(reversed(gguf_shape))} (GGUF order), the metadata "
                             f"implies {list(reversed(shape))}")
        weight = dequantize_tensor(tensor, where).reshape(shape)
        if name in q_names:
            weight = unpermute_rotary_rows(weight, config.num_heads)
        elif name in k_names:
            weight = unpermute_rotary_rows(weight, config.num_kv_heads)
        return weight

    return llama_from_hf_tensors(config, read)


def load_gguf_model(source: str) -> Llama:
    """A Llama from a GGUF file: a local path, or an fsspec URL (copied to a temporary local file first)."""
    if "://" not in source or source.startswith("file://"):
        path = source.removeprefix("file://")
        if not Path(path).is_file():
            raise ModelError(f"{source}: missing weight file")
        return llama_from_gguf_reader(open_gguf(path, source), source)
    fs, remote = fsspec.core.url_to_fs(source)
    if not fs.exists(remote):
        raise ModelError(f"{source}: missing weight file")
    # GGUFReader memory-maps a local file; the weights are copied out before the temporary file goes.
    with tempfile.TemporaryDirectory() as tmp:
        local = str(Path(tmp) / Path(remote).name)
        fs.get_file(remote, local)
        return llama_from_gguf_reader(open_gguf(local, source), source)
