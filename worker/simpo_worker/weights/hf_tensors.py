"""Where each tensor of an HF-format Llama checkpoint lives in a `Llama`, declared once (`hf_tensor_places`), and
a Llama assembled from HF-named tensors or taken apart into them.

HF stores linear weights [out, in] per layer; the model keeps [in, out] stacked on a leading layer axis, so loading
transposes and stacks, and saving undoes both (float32 in, float32 out: a save/load round trip is bit-identical).

Sharded assembly (`sharded_llama_from_hf`, what the worker does): every param is created directly on its target
sharding (weights.regions.from_regions), from the regions of the tensors this process's own devices hold, layer
by layer. A region is a block of rows of the stored [out, in] tensor cut down to its columns: a param split on an
HF column dimension (the model width d of q/k/v/gate/up, FSDP) reads its whole rows and keeps its columns, so host
memory stays at this process's share of the model plus one chunk.

The HF tensor names are the interchange layout: the GGUF loader maps its names onto them and reuses
`llama_from_hf_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.model.llama import DecoderLayers, Llama
from simpo_worker.weights.regions import from_regions

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

# Reads one tensor in HF orientation as float32, checking it exists and has `shape`; errors name the file.
TensorReader = Callable[[str, tuple[int, ...]], np.ndarray]
# Reads a region (one slice per dimension) of one tensor in HF orientation as float32, checked as above.
RegionReader = Callable[[str, tuple[int, ...], tuple[slice, ...]], np.ndarray]
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


