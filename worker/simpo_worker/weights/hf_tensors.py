"""HF-format Llama weights: a model directory with config.json + safetensors (one file, sharded with an index,
or several *.safetensors), local or any fsspec URL (gs://...). Load into a `Llama`, and save a `Llama` back.

HF stores linear weights [out, in] per layer; the model keeps [in, out] stacked on a leading layer axis, so loading
transposes and stacks, and saving undoes both (float32 in, float32 out: a save/load round trip is bit-identical).
Where each HF tensor lives in a Llama is declared once, in `hf_tensor_places`.

Tensors are read by a small safetensors reader of our own: the safetensors package's numpy backend has no bfloat16
(the dtype of most published checkpoints), and byte-range reads keep host memory flat and work the same over gcsfs
as on a local disk. Writing uses the safetensors package, in transformers' layout: one model.safetensors, or
model-0000i-of-0000N.safetensors files of at most max_shard_bytes each plus model.safetensors.index.json.

Sharded loading (`load_hf_model(source, shardings)`, what the worker does): every param is created directly on
its target sharding (mesh.from_regions), and each process reads only the regions of the tensors its own devices
hold, layer by layer, in byte ranges of at most READ_CHUNK_BYTES. A region is a block of rows of the stored
[out, in] tensor (one contiguous byte range per chunk of rows) cut down to its columns: a param split on an HF
column dimension (the model width d of q/k/v/gate/up, FSDP) reads its whole rows and keeps its columns, so host
memory stays at this process's share of the model plus one chunk.

The HF tensor names are the interchange layout: the GGUF loader maps its names onto them and reuses
`llama_from_hf_tensors`.
"""

from __future__ import annotations

import json
import math
import posixpath
import struct
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from simpo_worker import schema, storage
from simpo_worker.config import ArchitectureConfig, RopeScaling
from simpo_worker.errors import ConfigError, ModelError
from simpo_worker.mesh import from_regions
from simpo_worker.model import DecoderLayers, Llama

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# DecoderLayers field -> HF tensor name inside `model.layers.{i}.`; matrices are transposed, norms are not.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}

# Reads one tensor in HF orientation as float32, checking it exists and has `shape`; errors name the file.
TensorReader = Callable[[str, tuple[int, ...]], np.ndarray]
# Reads a region (one slice per dimension) of one tensor in HF orientation as float32, checked as above.
RegionReader = Callable[[str, tuple[int, ...], tuple[slice, ...]], np.ndarray]
# Largest single byte-range read of a sharded load (rows of a stored matrix at a time).
READ_CHUNK_BYTES = 32 << 20
# transformers' save_pretrained default max_shard_size ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
NORM_FIELDS = ("attn_norm", "mlp_norm")


def layer_tensor_name(layer: int, field: str) -> str:
    return f"model.layers.{layer}.{LAYER_TENSORS[field]}"


def hf_tensor_shapes(config: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, with its HF shape ([out, in] for matrices)."""
    c = config
    d, f, hd = c.hidden_size, c.intermediate_size, c.resolved_head_dim
    per_layer = {
        "attn_norm": (d,), "wq": (c.num_heads * hd, d), "wk": (c.num_kv_heads * hd, d),
        "wv": (c.num_kv_heads * hd, d), "wo": (d, c.num_heads * hd), "mlp_norm": (d,),
        "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
    }
    shapes = {EMBED: (c.vocab_size, d)}
    for i in range(c.num_layers):
        for field, shape in per_layer.items():
            shapes[layer_tensor_name(i, field)] = shape
    shapes[FINAL_NORM] = (d,)
    if not c.tie_word_embeddings:
        shapes[LM_HEAD] = (c.vocab_size, d)
    return shapes


@dataclass(frozen=True)
class TensorPlace:
    """Where an HF tensor lives in a Llama: the array (`embed`, `final_norm`, `lm_head` or `layers.<field>`), its
    layer (stacked fields), and whether HF stores it transposed ([out, in] against our [in, out])."""

    array: str
    layer: int | None
    transposed: bool

    def of(self, model: Llama) -> Any:
        owner, _, name = self.array.rpartition(".")
        return getattr(getattr(model, owner) if owner else model, name)


def hf_tensor_places(config: ArchitectureConfig) -> dict[str, TensorPlace]:
    """Every HF tensor of a checkpoint of this config, in transformers' order, and where it lives in a Llama."""
    places = {EMBED: TensorPlace("embed", None, False)}
    for i in range(config.num_layers):
        for field in LAYER_TENSORS:
            places[layer_tensor_name(i, field)] = TensorPlace(f"layers.{field}", i, field not in NORM_FIELDS)
    places[FINAL_NORM] = TensorPlace("final_norm", None, False)
    if not config.tie_word_embeddings:
        places[LM_HEAD] = TensorPlace("lm_head", None, True)
    return places


def to_hf_orientation(tensor: np.ndarray, place: TensorPlace) -> np.ndarray:
    """One tensor of ours (the layer's, for stacked fields) as HF stores it: float32, contiguous."""
    tensor = np.asarray(tensor, np.float32)
    return np.ascontiguousarray(tensor.T if place.transposed else tensor)


def llama_from_hf_tensors(config: ArchitectureConfig, read: TensorReader) -> Llama:
    """Assemble a Llama from HF-named tensors: transpose matrices to [in, out] and stack layers."""
    shapes = hf_tensor_shapes(config)
    stacked = {}
    for field in LAYER_TENSORS:
        first = read(layer_tensor_name(0, field), shapes[layer_tensor_name(0, field)])
        first = first.T if first.ndim == 2 else first
        out = np.empty((config.num_layers, *first.shape), np.float32)
        out[0] = first
        for i in range(1, config.num_layers):
            name = layer_tensor_name(i, field)
            tensor = read(name, shapes[name])
            out[i] = tensor.T if tensor.ndim == 2 else tensor
        stacked[field] = jnp.asarray(out)
    lm_head = None
    if not config.tie_word_embeddings:
        lm_head = jnp.asarray(read(LM_HEAD, shapes[LM_HEAD]).T)
    return Llama(
        config=config,
        embed=jnp.asarray(read(EMBED, shapes[EMBED])),
        layers=DecoderLayers(**stacked),
        final_norm=jnp.asarray(read(FINAL_NORM, shapes[FINAL_NORM])),
        lm_head=lm_head,
    )


def sharded_llama_from_hf(config: ArchitectureConfig, read: RegionReader, shardings: Llama) -> Llama:
    """A Llama whose every param is made on its sharding in `shardings` from the regions of HF-named tensors that
    this process's devices hold (stacked layers: the layers of the region, each transposed to [in, out])."""
    shapes = hf_tensor_shapes(config)

    def matrix(name: str, index: tuple[slice, slice]) -> np.ndarray:
        """Our [in, out] region of HF tensor `name` ([out, in])."""
        return read(name, shapes[name], (index[1], index[0])).T

    def stacked(field: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        layers = range(*index[0].indices(shape[0]))
        out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape)], np.float32)
        for row, i in enumerate(layers):
            name = layer_tensor_name(i, field)
            out[row] = matrix(name, index[1:]) if len(shape) == 3 else read(name, shapes[name], index[1:])
        return out

    c = config
    d, L = c.hidden_size, c.num_layers
    layers = {}
    for field in LAYER_TENSORS:
        hf_shape = shapes[layer_tensor_name(0, field)]
        shape = (L, *(hf_shape[::-1]))
        layers[field] = from_regions(shape, np.float32, getattr(shardings.layers, field),
                                     lambda index, field=field, shape=shape: stacked(field, shape, index))
    lm_head = None
    if not c.tie_word_embeddings:
        lm_head = from_regions((d, c.vocab_size), np.float32, shardings.lm_head,
                               lambda index: matrix(LM_HEAD, index))
    return Llama(
        config=c,
        embed=from_regions((c.vocab_size, d), np.float32, shardings.embed,
                           lambda index: read(EMBED, shapes[EMBED], index)),
        layers=DecoderLayers(**layers),
        final_norm=from_regions((d,), np.float32, shardings.final_norm,
                                lambda index: read(FINAL_NORM, shapes[FINAL_NORM], index)),
        lm_head=lm_head,
    )


def llama_to_hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The inverse of llama_from_hf_tensors (one process, the whole model): HF names and orientation, float32."""
    return {name: hf_tensor(model, place) for name, place in hf_tensor_places(model.config).items()}


def hf_tensor(model: Llama, place: TensorPlace) -> np.ndarray:
    array = np.asarray(place.of(model))
    return to_hf_orientation(array if place.layer is None else array[place.layer], place)


# ---- config.json <-> ArchitectureConfig ------------------------------------------------------------------------


def config_from_hf(data: Any, where: str) -> ArchitectureConfig:
    """Map an HF LlamaForCausalLM config.json (transformers 4 or 5 layout) to ArchitectureConfig."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type != "llama":
        raise ModelError(f"{where}: unsupported architecture: model_type {model_type!r} "
                         f"(architectures {data.get('architectures')}); only Llama (model_type 'llama') is supported")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {data['hidden_act']!r} is not supported (only 'silu')")
    for bias in ("attention_bias", "mlp_bias"):
        if data.get(bias):
            raise ModelError(f"{where}: {bias}: true is not supported (Llama has no biases)")

    def required(key: str) -> Any:
        if key not in data:
            raise ModelError(f"{where}: required key {key!r} is missing")
        return data[key]

    # transformers 5 writes rope_parameters (with rope_theta inside); older files have rope_theta + rope_scaling.
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        try:
            rope_scaling = RopeScaling(factor=float(rope["factor"]),
                                       low_freq_factor=float(rope["low_freq_factor"]),
                                       high_freq_factor=float(rope["high_freq_factor"]),
                                       original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        except KeyError as error:
            raise ModelError(f"{where}: llama3 rope scaling is missing {error}") from error
    else:
        raise ModelError(f"{where}: rope type {rope_type!r} is not supported (only default and llama3)")

    eos = data.get("eos_token_id")
    heads = required("num_attention_heads")
    # head_dim None means hidden_size // num_heads, as HF; keeps a save/load round trip equal.
    head_dim = data.get("head_dim")
    if head_dim == required("hidden_size") // heads:
        head_dim = None
    config = ArchitectureConfig(
        vocab_size=required("vocab_size"),
        hidden_size=required("hidden_size"),
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings", 2048),
        bos_token_id=data.get("bos_token_id"),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
    )
    try:
        schema.validate(config, where)
    except ConfigError as error:
        raise ModelError(str(error)) from error
    return config


def config_to_hf(config: ArchitectureConfig) -> dict[str, Any]:
    """config.json in the layout every transformers version reads (rope_theta + rope_scaling)."""
    c = config
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.resolved_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "torch_dtype": "float32",
    }
    if c.rope_scaling is not None:
        s = c.rope_scaling
        data["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                "high_freq_factor": s.high_freq_factor,
                                "original_max_position_embeddings": s.original_max_position_embeddings}
    if c.bos_token_id is not None:
        data["bos_token_id"] = c.bos_token_id
    if c.eos_token_ids:
        data["eos_token_id"] = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids)
    return data


# ---- safetensors reading ---------------------------------------------------------------------------------------


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
