"""The engine's jitted programs: prefill, the decode loop, window growth and compaction of a batch with its KV cache.

Pure functions of explicit arguments. Everything that fixes a program but is not an array (architecture,
sampling, max_new_tokens, stop ids, placement) travels in one hashable static `DecodeSpec`; each program is
traced once per (spec, shapes) and can be lowered on ShapeDtypeStructs as it is (`prefill.lower(spec, ...)`).
The host loop that drives them (waves, buckets, when to grow or compact) is engine.py.

The prefill is the model's own decoder layer (`decoder_layer_with_kv`), keeping the keys and values it made.
The decode step is this module's own attention over the cache around the model's q/k/v and MLP blocks, laid out
for a memory-bound step (at large batch the cache is as large as the weights, and every step reads all of it):
- one cache buffer per layer, updated in place inside the loop, and per-layer weight arrays (no layer slice
  copied per step);
- keys stored transposed, [batch, kv_heads, head_dim, slots], values [batch, kv_heads, slots, head_dim], so both
  attention matmuls stream their cache operand contiguously;
- the causal rule as one additive bias per step, shared by every layer, and the softmax normalised after the
  value matmul (a division of [B, heads, head_dim] rather than of [B, heads, slots]).
The math is the model's (float32 softmax, GQA); parity with HF transformers is tested through golden files.
Measurements behind these choices: bench/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.infer.sampling import SamplingParams, next_tokens, prompt_keys, token_keys
from simpo_worker.model.layout import kv_heads_axis, param_spec
from simpo_worker.model.llama import (DecoderLayers, Llama, attention_inputs, decoder_layer_with_kv, linear,
                                      mlp_residual, rms_norm, rotary_tables)
from simpo_worker.parallel.jit import counted_jit

# The slot axis of the per-layer caches (see DecodeState).
KEY_SLOT_AXIS, VALUE_SLOT_AXIS = 3, 2


@dataclass(frozen=True)
class DecodeSpec:
    """The static settings of every decode program (a jit static argument: hashable)."""

    # Compared, not hashed: ArchitectureConfig holds a list (eos_token_ids). The other fields tell specs apart.
    arch: ArchitectureConfig = field(hash=False)
    sampling: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    ignore_eos: bool
    mesh: Mesh
    # The per-row state's sharding on `mesh`: P("data") splits the batch; P() replicates it on every device.
    batch_spec: P


class DecodeWeights(eqx.Module):
    """The model's params with the layer axis unstacked into a tuple, cast to the compute dtype."""

    embed: jax.Array
    layers: tuple[DecoderLayers, ...]
    final_norm: jax.Array
    head: jax.Array  # [d, V]: the output head (the embedding transposed when tied)


class DecodeState(eqx.Module):
    tokens: jax.Array      # [B] the last sampled token, fed at the next step
    positions: jax.Array   # [B] that token's position (= its cache slot)
    generated: jax.Array   # [] tokens generated so far (the same for every row of a wave)
    counts: jax.Array      # [B] tokens kept per row (stops growing once the row is done)
    done: jax.Array        # [B]
    stopped: jax.Array     # [B] done because of a stop token (else: length, or an empty slot)
    out: jax.Array         # [B, max_new_tokens]
    keys: jax.Array        # [B] per-prompt PRNG keys
    k: tuple[jax.Array, ...]  # per layer [B, kv_heads, head_dim, window] (keys transposed)
    v: tuple[jax.Array, ...]  # per layer [B, kv_heads, window, head_dim]


def decode_weights(model: Llama, dtype) -> DecodeWeights:
    layers = jax.tree.map(lambda a: a.astype(dtype), model.layers)
    head = model.embed.T if model.lm_head is None else model.lm_head
    return DecodeWeights(
        embed=model.embed.astype(dtype),
        layers=tuple(jax.tree.map(lambda a: a[i], layers) for i in range(model.config.num_layers)),
        final_norm=model.final_norm.astype(dtype),
        head=head.astype(dtype))


def weight_shardings(weights: DecodeWeights, arch: ArchitectureConfig, mesh: Mesh) -> DecodeWeights:
    """Where the decode weights live on `mesh`: each as its model param is laid out (layout.PARAM_AXES; the head as
    lm_head, which is also the tied embedding transposed), per layer."""
    spec = lambda name, array: NamedSharding(mesh, param_spec(name, array.shape, arch, mesh.shape))  # noqa: E731
    return DecodeWeights(
        embed=spec("embed", weights.embed),
        layers=tuple(jax.tree_util.tree_map_with_path(lambda path, array: spec(path[-1].name, array), layer)
                     for layer in weights.layers),
        final_norm=spec("final_norm", weights.final_norm),
        head=spec("lm_head", weights.head))


# ---- the programs -------------------------------------------------------------------------------------------

@counted_jit(static_argnames=("spec", "window"))
def prefill(spec: DecodeSpec, weights: DecodeWeights, tokens, lengths, global_index, active, step, seed, *,
            window: int) -> DecodeState:
    """Right-padded prompts tokens [B, T] (true lengths [B]; `active` False for empty slots) -> the state after
    the first sampled token, with a cache of `window` slots."""
    batch, length = tokens.shape
    c = spec.arch
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cos, sin = rotary_tables(c, positions)
    x = weights.embed[tokens]
    k, v = [], []
    for layer in weights.layers:
        # Padding keys land in slots past a row's prompt: hidden by the causal rule until overwritten.
        x, layer_k, layer_v = decoder_layer_with_kv(c, layer, x, positions, cos, sin)
        k.append(_pad_slots(layer_k.transpose(0, 2, 3, 1), KEY_SLOT_AXIS, window))
        v.append(_pad_slots(layer_v.transpose(0, 2, 1, 3), VALUE_SLOT_AXIS, window))
    k, v = tuple(k), tuple(v)
    hidden = rms_norm(x, weights.final_norm, c.rms_norm_eps)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = linear(last, weights.head, jnp.float32)

    keys = prompt_keys(seed, step, global_index)
    first = next_tokens(logits, token_keys(keys, 0), spec.sampling)
    out = jnp.zeros((batch, spec.max_new_tokens), jnp.int32).at[:, 0].set(first)
    stopped = active & _is_stop(spec, first)
    done = ~active | stopped | (spec.max_new_tokens == 1)
    state = DecodeState(tokens=first, positions=lengths, generated=jnp.int32(1), counts=active.astype(jnp.int32),
                        done=done, stopped=stopped, out=out, keys=keys, k=k, v=v)
    return _constrain(spec, state)


@counted_jit(static_argnames=("spec",), donate_argnames=("state",))
def decode_chunk(spec: DecodeSpec, weights: DecodeWeights, state: DecodeState, stop_at) -> DecodeState:
    """Decode until `stop_at` tokens exist or every row is done (the cache must hold the window that needs)."""

    def running(s: DecodeState):
        return (s.generated < stop_at) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        hidden, k, v = _decode_forward(spec.arch, weights, s.tokens, s.positions, s.k, s.v)
        logits = linear(hidden, weights.head, jnp.float32)
        new = next_tokens(logits, token_keys(s.keys, s.generated), spec.sampling)
        live = ~s.done
        stop = live & _is_stop(spec, new)
        return DecodeState(
            tokens=new,
            positions=s.positions + live,  # finished rows stay put, inside the window
            generated=s.generated + 1,
            counts=s.counts + live,
            done=s.done | stop | (s.generated + 1 >= spec.max_new_tokens),
            stopped=s.stopped | stop,
            out=jax.lax.dynamic_update_index_in_dim(s.out, jnp.where(live, new, 0), s.generated, axis=1),
            keys=s.keys, k=k, v=v)

    return _constrain(spec, jax.lax.while_loop(running, step, state))


# No donation: the cache buffers change shape.
@counted_jit(static_argnames=("window",))
def grow_window(state: DecodeState, window: int) -> DecodeState:
    """The state with its caches padded to `window` slots."""
    k = tuple(_pad_slots(k, KEY_SLOT_AXIS, window) for k in state.k)
    v = tuple(_pad_slots(v, VALUE_SLOT_AXIS, window) for v in state.v)
    return eqx.tree_at(lambda s: (s.k, s.v), state, (k, v))


@counted_jit(static_argnames=("spec",))
def compact(spec: DecodeSpec, state: DecodeState, keep) -> DecodeState:
    """The state of the batch rows `keep` [B'] only, in that order."""
    per_row = lambda s: (s.tokens, s.positions, s.counts, s.done, s.stopped, s.out, s.keys, s.k, s.v)
    return _constrain(spec, eqx.tree_at(per_row, state, jax.tree.map(lambda a: a[keep], per_row(state))))


# ---- inside the programs ------------------------------------------------------------------------------------

def _is_stop(spec: DecodeSpec, tokens):
    if spec.ignore_eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.array(spec.stop_ids, jnp.int32))


def _constrain(spec: DecodeSpec, state: DecodeState) -> DecodeState:
    """Keep the per-row flags on the batch sharding (replicated in global_mesh mode, so every host reads
    the same values and takes the same branches), and the KV cache split by batch the same way and by KV head
    as the k/v projections are (layout.PARAM_AXES), so attention stays head-local."""
    sharding = NamedSharding(spec.mesh, spec.batch_spec)
    small = lambda s: (s.tokens, s.positions, s.counts, s.done, s.stopped, s.out)
    batch_axis = spec.batch_spec[0] if len(spec.batch_spec) else None
    cache = NamedSharding(spec.mesh, P(batch_axis, kv_heads_axis(spec.arch, spec.mesh.shape)))
    return eqx.tree_at(lambda s: (*small(s), s.k, s.v), state,
                       (*jax.lax.with_sharding_constraint(small(state), sharding),
                        jax.lax.with_sharding_constraint(state.k, cache),
                        jax.lax.with_sharding_constraint(state.v, cache)))


def _decode_forward(c: ArchitectureConfig, w: DecodeWeights, tokens, positions, k_cache, v_cache):
    """One token per row: tokens [B] at positions [B] -> final-normed hidden [B, d]; writes their K/V into
    the cache at slot = position."""
    cos, sin = rotary_tables(c, positions[:, None])
    slots = jnp.arange(k_cache[0].shape[KEY_SLOT_AXIS])
    # The causal rule (which also hides padding and stale slots) as an additive bias, [B, 1, 1, slots].
    bias = jnp.where(slots[None, :] <= positions[:, None], 0.0, -jnp.inf)[:, None, None, :]
    x = w.embed[tokens][:, None]
    new_k, new_v = [], []
    for layer, ck, cv in zip(w.layers, k_cache, v_cache):
        x, ck, cv = _decode_layer(c, layer, x, positions, cos, sin, bias, ck, cv)
        new_k.append(ck)
        new_v.append(cv)
    return rms_norm(x[:, 0], w.final_norm, c.rms_norm_eps), tuple(new_k), tuple(new_v)


def _decode_layer(c: ArchitectureConfig, w: DecoderLayers, x, positions, cos, sin, bias, cache_k, cache_v):
    """The model's decoder layer for one token per row. x [B, 1, d]; positions [B]; caches as in DecodeState."""
    batch = x.shape[0]
    hd, kv_heads = c.resolved_head_dim, c.num_kv_heads
    q, k, v = attention_inputs(c, w, x, cos, sin)
    rows = jnp.arange(batch)
    cache_k = cache_k.at[rows, :, :, positions].set(k[:, 0])
    cache_v = cache_v.at[rows, :, positions].set(v[:, 0])
    with jax.named_scope("attention"):
        # Query heads grouped by the KV head they share (HF's repeat_kv order): [B, kv, group, hd].
        q = q.reshape(batch, kv_heads, -1, hd) * (1 / math.sqrt(hd))
        scores = jnp.einsum("bkgd,bkds->bkgs", q, cache_k).astype(jnp.float32) + bias
        unnormalised = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = jnp.einsum("bkgs,bksd->bkgd", unnormalised.astype(cache_v.dtype), cache_v)
        attn = attn / unnormalised.sum(axis=-1, keepdims=True).astype(attn.dtype)
    return mlp_residual(c, w, x + linear(attn.reshape(batch, 1, -1), w.wo)), cache_k, cache_v


def _pad_slots(cache: jax.Array, axis: int, window: int) -> jax.Array:
    """The cache with empty slots appended up to `window`."""
    return jnp.pad(cache, [(0, window - cache.shape[axis]) if a == axis else (0, 0) for a in range(cache.ndim)])
