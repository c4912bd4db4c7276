"""The layout of every weight and activation on a mesh, declared once (the model and the mesh both read it).

Mesh axes: `data` (pure data parallel: replicated params), `fsdp` (data parallel with params and optimizer state
sharded on the model width d), `model` (tensor parallelism, Megatron style: attention heads, MLP hidden units and
the vocabulary split over it). Which dimension of which weight goes where is declared in PARAM_AXES and RULES
below; optimizer state follows its params. Batches split their pair axis over data x fsdp.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from simpo_worker.contract.config import ArchitectureConfig

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# As in the JAX team's single-file Llama examples: each dimension of each weight has a logical name, and RULES says
# which mesh axis splits that name. Megatron tensor parallelism over `model`: q/k/v are split by attention head
# (columns) and wo by head (rows), so attention runs head-local and wo's partial sums meet in one all-reduce; the
# same for the MLP (gate/up by hidden unit, w_down by hidden unit) and for the vocabulary (embedding rows, head
# columns: logits come out split by vocab). FSDP over `fsdp`: the model width d, in every matrix. A dimension is
# split only in whole units (a head, not part of one) that the axis size divides; otherwise it stays whole on that
# axis (replicated). Axes absent from a mesh (a host's local inference mesh has no `fsdp`) split nothing.

LAYERS, EMBED, HEADS, KV_HEADS, FFN, VOCAB, NORM = "layers", "embed", "heads", "kv_heads", "ffn", "vocab", "norm"

RULES = {EMBED: "fsdp", HEADS: "model", KV_HEADS: "model", FFN: "model", VOCAB: "model", LAYERS: None,
         NORM: None}

# Weight (the Llama / DecoderLayers field) -> the logical name of each dimension. DecoderLayers fields are stacked
# on a leading LAYERS axis in the model; the decode programs hold them per layer (without it).
PARAM_AXES = {
    "embed": (VOCAB, EMBED),       # [V, d]
    "attn_norm": (NORM,),          # [d]
    "wq": (EMBED, HEADS),          # [d, heads * head_dim]
    "wk": (EMBED, KV_HEADS),       # [d, kv_heads * head_dim]
    "wv": (EMBED, KV_HEADS),       # [d, kv_heads * head_dim]
    "wo": (HEADS, EMBED),          # [heads * head_dim, d]
    "mlp_norm": (NORM,),           # [d]
    "w_gate": (EMBED, FFN),        # [d, f]
    "w_up": (EMBED, FFN),          # [d, f]
    "w_down": (FFN, EMBED),        # [f, d]
    "final_norm": (NORM,),         # [d]
    "lm_head": (EMBED, VOCAB),     # [d, V] (decode's head is this, or the tied embedding transposed: same layout)
}


def logical_axis(logical: str, units: int, mesh_shape) -> str | None:
    """The mesh axis that splits a dimension of `units` whole units (heads, or elements), or None."""
    axis = RULES[logical]
    size = mesh_shape.get(axis, 1) if axis is not None else 1
    return axis if size > 1 and units % size == 0 else None


def param_spec(name: str, shape: tuple[int, ...], config: ArchitectureConfig, mesh_shape) -> P:
    """The PartitionSpec of weight `name` (a PARAM_AXES key) of `shape`, stacked on a layer axis or not."""
    axes = PARAM_AXES[name]
    axes = (LAYERS,) * (len(shape) - len(axes)) + axes
    units = {HEADS: config.num_heads, KV_HEADS: config.num_kv_heads}
    return P(*[logical_axis(logical, units.get(logical, size), mesh_shape) for logical, size in zip(axes, shape)])


def kv_heads_axis(config: ArchitectureConfig, mesh_shape) -> str | None:
    """The mesh axis that splits the KV heads (of the decode programs' KV cache), or None."""
    return logical_axis(KV_HEADS, config.num_kv_heads, mesh_shape)


def constrain_batch(x):
    """An activation [batch, ...] with its batch split over the data-parallel axes and every other dimension whole
    on the mesh the program is traced for (the train step sets it with jax.sharding.use_abstract_mesh); x as it is
    when none is set. Without it the partitioner may follow the weights' `fsdp`-split width into the activations
    and run every data-parallel device on the whole batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    batch = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, P(batch, *[None] * (x.ndim - 1)))

