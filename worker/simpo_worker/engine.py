"""Batched generation from the live model: prefill, then a jitted decode loop over a preallocated KV cache.

How a call runs:
- The prompts are cut into waves of at most `inference.batch_size` slots. A wave is right-padded to a length
  bucket and prefilled in one forward; then a `lax.while_loop` decodes up to `CHUNK_STEPS` tokens per call and
  stops early once every sequence has finished. Between chunks the host only reads a few flags (and reports
  progress). A wave ends when its longest sequence ends. Once at most half of its rows still decode, the
  finished rows' results are kept and the batch is compacted to the next smaller bucket (cache rows included),
  so a long tail costs the compute and memory of its own rows, not of the whole wave. Waves, not continuous
  refill: on the reference workload with EOS honoured (bench/m11_inference.py, 128 prompts in 4 waves of 32)
  75% of the row-steps run produce kept tokens (`row_steps`), so refilling finished slots could win back at
  most the other 25%, and in the reference workflow each host holds a single wave (32 prompts) anyway.
- Every shape is bucketed (batch: power of two up to batch_size; prompt length: multiples of PROMPT_BUCKET;
  attention window: see WINDOW_BUCKET), so a second call with similar prompts compiles nothing.
  `compilations` counts traces of the engine's jitted programs.
- The cache slot of a token is its position. The cache holds only the attention window the current chunk
  needs and grows between chunks, so early steps do not pay for attention over the full `prompt + max_new_tokens`.

The prefill is the model's own decoder layer (`decoder_layer_with_kv`), keeping the keys and values it made.
The decode step is the engine's own attention over the cache around the model's q/k/v and MLP blocks, laid out
for a memory-bound step (at batch 32 the cache is as large as the weights, and every step reads all of it):
- one cache buffer per layer, updated in place inside the loop, and per-layer weight arrays (no layer slice
  copied per step);
- keys stored transposed, [batch, kv_heads, head_dim, slots], values [batch, kv_heads, slots, head_dim], so both
  attention matmuls stream their cache operand contiguously (`bench/bench_decode.py` prints the step next to
  its matmul floor);
- the causal rule as one additive bias per step, shared by every layer, and the softmax normalised after the
  value matmul (a division of [B, heads, head_dim] rather than of [B, heads, slots]).
Each of the last two measured about 1.4x faster attention on CPU at batch 32. The math is the model's (float32
softmax, GQA); parity with HF transformers is tested through golden files.

Placements (inference.mode):
- host_data_parallel: the params are copied once per call to a replica on this host's local devices (gathered
  first if training sharded them across hosts), the batch is split over the local devices, and decoding uses
  no cross-host communication. Each host passes its own shard of the prompts.
- global_mesh: the params stay as the trainer sharded them on the global mesh; every host passes the same
  prompts and runs the same programs in the same order (the host loop branches only on replicated values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.config import ArchitectureConfig, InferenceConfig
from simpo_worker.errors import ConfigError, DataError
from simpo_worker.model import (DecoderLayers, Llama, attention_inputs, decoder_layer_with_kv, mlp_residual,
                                rms_norm, rotary_tables)
from simpo_worker.sampling import SamplingParams, next_tokens, prompt_keys, token_keys

# Decode steps per jitted call: the host checks for "all finished" and reports progress this often.
CHUNK_STEPS = 64
PROMPT_BUCKET = 64
# The attention window grows in steps of WINDOW_BUCKET slots, or of WINDOW_ROW_SLOTS / batch rows if more: each
# window size compiles the decode loop again (about 1 s for SmolLM2), while a step reads its whole window. At
# batch 32 a step of 256 had a 128 + 256 token request read a third more cache than it held for half its steps;
# at batch 1 (a compacted tail) the cache is small, and a step of 128 spent half the time compiling.
WINDOW_BUCKET = 128
WINDOW_ROW_SLOTS = 2048
# The slot axis of the per-layer caches (see DecodeState).
KEY_SLOT_AXIS, VALUE_SLOT_AXIS = 3, 2


@dataclass
class Completion:
    global_prompt_index: int
    # Generated tokens, including the stop token when finish_reason is "stop" (as HF generate and vLLM).
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


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


class Engine:
    def __init__(self, arch: ArchitectureConfig, inference: InferenceConfig, eos_token_ids: list[int],
                 compute_dtype=jnp.float32, mesh: Optional[Mesh] = None):
        self.arch = arch
        self.inference = inference
        self.compute_dtype = compute_dtype
        self.sampling = SamplingParams.from_config(inference)
        self.stop_ids = tuple(sorted(set(eos_token_ids)))
        if not self.stop_ids and not inference.ignore_eos:
            raise ConfigError("inference: no EOS / stop token ids for the engine; set ignore_eos or give the "
                              "tokenizer's end-of-generation ids")
        if inference.mode == "global_mesh":
            if mesh is None:
                raise ConfigError("inference.mode: global_mesh needs the training mesh")
            self.mesh = mesh
            self.batch_spec = P()  # every host holds the whole (identical) batch
            self.batch_multiple = 1
        else:
            self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
            self.batch_spec = P("data")
            self.batch_multiple = len(jax.local_devices())
        self.max_slots = _round_up(inference.batch_size, self.batch_multiple)
        self.compilations = 0
        self.compactions = 0  # batches shrunk mid-wave (finished rows dropped)
        # Batch rows x sampling steps run, empty and finished rows included: generated tokens / row_steps is the
        # share of the work that produced kept tokens (what continuous refill of finished slots could raise).
        self.row_steps = 0
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("window",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        self._grow = jax.jit(self._grow_fn, static_argnums=(1,))
        self._compact = jax.jit(self._compact_fn)

    # ---- public ----------------------------------------------------------------------------------------

    def cache_limit(self) -> int:
        return self.inference.max_prompt_len + self.inference.max_new_tokens

    def check_request(self, prompts: list[list[int]], global_indices: list[int]) -> None:
        """Fail before any work if a prompt cannot be generated in full: names the prompt and the limit."""
        if len(prompts) != len(global_indices):
            raise ValueError(f"{len(prompts)} prompts but {len(global_indices)} global indices")
        inf, limit = self.inference, self.cache_limit()
        for prompt, index in zip(prompts, global_indices):
            if not prompt:
                raise DataError(f"prompt {index}: empty (no tokens to condition on)")
            total = len(prompt) + inf.max_new_tokens
            if len(prompt) > inf.max_prompt_len:
                raise DataError(
                    f"prompt {index}: {len(prompt)} tokens + max_new_tokens {inf.max_new_tokens} = {total} does "
                    f"not fit the KV cache of {limit} tokens (inference.max_prompt_len {inf.max_prompt_len} + "
                    f"inference.max_new_tokens {inf.max_new_tokens})")
            if total > self.arch.max_position_embeddings:
                raise DataError(
                    f"prompt {index}: {len(prompt)} tokens + max_new_tokens {inf.max_new_tokens} = {total} exceeds "
                    f"the model's max_position_embeddings {self.arch.max_position_embeddings}")

    def generate(self, model: Llama, prompts: list[list[int]], global_indices: list[int], *, step: int, seed: int,
                 progress: Optional[Callable[[int, int], None]] = None) -> list[Completion]:
        """Complete every prompt; `progress(prompts_done, tokens_generated)` is called after each chunk."""
        self.check_request(prompts, global_indices)
        if not prompts:
            return []
        weights = self._weights(model)
        completions: list[Completion] = []
        start = 0
        while start < len(prompts):
            slots = self._wave_slots(len(prompts) - start)
            wave = slice(start, min(start + slots, len(prompts)))
            finished, tokens_before = len(completions), sum(len(c.token_ids) for c in completions)

            def wave_progress(done: int, tokens: int) -> None:
                if progress is not None:
                    progress(finished + done, tokens_before + tokens)

            completions += self._run_wave(weights, prompts[wave], global_indices[wave], slots, step, seed,
                                          wave_progress)
            start = wave.stop
        return completions

    # ---- host side -------------------------------------------------------------------------------------

    def _wave_slots(self, remaining: int) -> int:
        return min(self.max_slots, _round_up(1 << (remaining - 1).bit_length(), self.batch_multiple))

    def _run_wave(self, weights, prompts, indices, slots, step, seed, progress):
        inf = self.inference
        n = len(prompts)
        longest = max(len(p) for p in prompts)
        length = _round_up(longest, PROMPT_BUCKET)
        tokens = np.zeros((slots, length), np.int32)
        lengths = np.ones((slots,), np.int32)  # empty slots: a one-token dummy prompt, done from the start
        global_index = np.zeros((slots,), np.int32)
        for row, (prompt, index) in enumerate(zip(prompts, indices)):
            tokens[row, :len(prompt)] = prompt
            lengths[row] = len(prompt)
            global_index[row] = index
        active = np.arange(slots) < n

        window = self._window(longest, min(CHUNK_STEPS, inf.max_new_tokens), slots)
        put = self._place
        state = self._prefill(weights, put(tokens), put(lengths), put(global_index), put(active),
                              jnp.int32(step), jnp.int32(seed), window=window)
        rows = np.arange(slots)  # the wave row (prompt) that each batch row holds
        results: dict[int, Completion] = {}
        stepped_rows, stepped_from = slots, 0  # the prefill sampled one token in every slot
        while True:
            generated, done, counts = _to_host(state.generated), _to_host(state.done), _to_host(state.counts)
            self.row_steps += stepped_rows * (int(generated) - stepped_from)
            real = rows < n
            held = set(rows[real].tolist())
            progress(len(set(results) - held) + int((done & real).sum()),
                     sum(len(c.token_ids) for r, c in results.items() if r not in held) + int(counts[real].sum()))
            if done.all():
                break
            live = np.flatnonzero(~done)
            smaller = self._wave_slots(len(live))
            if smaller < len(rows):
                # At most half the rows still decode: keep the finished ones' results and go on with a smaller
                # batch (finished rows would otherwise cost a full row of compute and cache every step).
                self._collect(state, rows, done & real, indices, results)
                keep = np.concatenate([live, np.flatnonzero(done)[:smaller - len(live)]]).astype(np.int32)
                state = self._compact(state, self._place(keep, P()))
                self.compactions += 1
                rows = rows[keep]
            stop_at = min(int(generated) + CHUNK_STEPS, inf.max_new_tokens)
            needed = self._window(longest, stop_at, len(rows))
            if needed > window:
                state = self._grow(state, needed)
                window = needed
            stepped_rows, stepped_from = len(rows), int(generated)
            state = self._decode(weights, state, jnp.int32(stop_at))

        self._collect(state, rows, rows < n, indices, results)
        return [results[row] for row in range(n)]

    @staticmethod
    def _collect(state: DecodeState, rows: np.ndarray, mask: np.ndarray, indices, results: dict) -> None:
        """Completions of the batch rows in `mask`, keyed by their wave row."""
        out, counts, stopped = _to_host(state.out), _to_host(state.counts), _to_host(state.stopped)
        for b in np.flatnonzero(mask):
            results[int(rows[b])] = Completion(global_prompt_index=int(indices[rows[b]]),
                                               token_ids=out[b, :counts[b]].tolist(),
                                               finish_reason="stop" if stopped[b] else "length")

    def _window(self, longest_prompt: int, generated_by: int, rows: int) -> int:
        """Cache slots needed until `generated_by` tokens exist (the last one fed sits at position
        prompt + generated_by - 2; the final token is sampled, never fed), rounded up to the window bucket of a
        batch of `rows` and capped at what the whole request can use."""
        bucket = _round_up(max(WINDOW_BUCKET, WINDOW_ROW_SLOTS // rows), WINDOW_BUCKET)
        whole_request = _round_up(longest_prompt + self.inference.max_new_tokens - 1, WINDOW_BUCKET)
        return min(_round_up(longest_prompt + generated_by - 1, bucket), whole_request)

    def _place(self, array: np.ndarray, spec: Optional[P] = None) -> jax.Array:
        """Host data (identical on every host in global_mesh mode) onto the engine's batch sharding."""
        sharding = NamedSharding(self.mesh, self.batch_spec if spec is None else spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _weights(self, model: Llama) -> DecodeWeights:
        if self.inference.mode == "host_data_parallel":
            model = _local_replica(model, NamedSharding(self.mesh, P()))
        return decode_weights(model, self.compute_dtype)

    # ---- jitted programs (traced once per shape bucket) ----------------------------------------------

    def _prefill_fn(self, weights: DecodeWeights, tokens, lengths, global_index, active, step, seed, *, window):
        self.compilations += 1
        inf = self.inference
        batch, length = tokens.shape
        c = self.arch
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
        logits = (last @ weights.head).astype(jnp.float32)

        keys = prompt_keys(seed, step, global_index)
        first = next_tokens(logits, token_keys(keys, 0), self.sampling)
        out = jnp.zeros((batch, inf.max_new_tokens), jnp.int32).at[:, 0].set(first)
        stopped = active & self._is_stop(first)
        done = ~active | stopped | (inf.max_new_tokens == 1)
        state = DecodeState(tokens=first, positions=lengths, generated=jnp.int32(1), counts=active.astype(jnp.int32),
                            done=done, stopped=stopped, out=out, keys=keys, k=k, v=v)
        return self._constrain(state)

    def _decode_fn(self, weights: DecodeWeights, state: DecodeState, stop_at):
        self.compilations += 1

        def running(s: DecodeState):
            return (s.generated < stop_at) & ~jnp.all(s.done)

        def step(s: DecodeState) -> DecodeState:
            hidden, k, v = self._decode_forward(weights, s.tokens, s.positions, s.k, s.v)
            logits = (hidden @ weights.head).astype(jnp.float32)
            new = next_tokens(logits, token_keys(s.keys, s.generated), self.sampling)
            live = ~s.done
            stop = live & self._is_stop(new)
            return DecodeState(
                tokens=new,
                positions=s.positions + live,  # finished rows stay put, inside the window
                generated=s.generated + 1,
                counts=s.counts + live,
                done=s.done | stop | (s.generated + 1 >= self.inference.max_new_tokens),
                stopped=s.stopped | stop,
                out=jax.lax.dynamic_update_index_in_dim(s.out, jnp.where(live, new, 0), s.generated, axis=1),
                keys=s.keys, k=k, v=v)

        return self._constrain(jax.lax.while_loop(running, step, state))

    def _grow_fn(self, state: DecodeState, window: int) -> DecodeState:
        self.compilations += 1
        k = tuple(_pad_slots(k, KEY_SLOT_AXIS, window) for k in state.k)
        v = tuple(_pad_slots(v, VALUE_SLOT_AXIS, window) for v in state.v)
        return eqx.tree_at(lambda s: (s.k, s.v), state, (k, v))

    def _compact_fn(self, state: DecodeState, keep) -> DecodeState:
        self.compilations += 1
        per_row = lambda s: (s.tokens, s.positions, s.counts, s.done, s.stopped, s.out, s.keys, s.k, s.v)
        return self._constrain(eqx.tree_at(per_row, state, jax.tree.map(lambda a: a[keep], per_row(state))))

    def _is_stop(self, tokens):
        if self.inference.ignore_eos:
            return jnp.zeros(tokens.shape, bool)
        return jnp.isin(tokens, jnp.array(self.stop_ids, jnp.int32))

    def _constrain(self, state: DecodeState) -> DecodeState:
        """Keep the per-row flags on the batch sharding (replicated in global_mesh mode, so every host reads
        the same values and takes the same branches)."""
        sharding = NamedSharding(self.mesh, self.batch_spec)
        small = lambda s: (s.tokens, s.positions, s.counts, s.done, s.stopped, s.out)
        return eqx.tree_at(small, state, jax.lax.with_sharding_constraint(small(state), sharding))

    def _decode_forward(self, w: DecodeWeights, tokens, positions, k_cache, v_cache):
        """One token per row: tokens [B] at positions [B] -> final-normed hidden [B, d]; writes their K/V into
        the cache at slot = position."""
        c = self.arch
        cos, sin = rotary_tables(c, positions[:, None])
        slots = jnp.arange(k_cache[0].shape[3])
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
    # Query heads grouped by the KV head they share (HF's repeat_kv order): [B, kv, group, hd].
    q = q.reshape(batch, kv_heads, -1, hd) * (1 / math.sqrt(hd))
    scores = jnp.einsum("bkgd,bkds->bkgs", q, cache_k).astype(jnp.float32) + bias
    unnormalised = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    attn = jnp.einsum("bkgs,bksd->bkgd", unnormalised.astype(cache_v.dtype), cache_v)
    attn = attn / unnormalised.sum(axis=-1, keepdims=True).astype(attn.dtype)
    return mlp_residual(c, w, x + attn.reshape(batch, 1, -1) @ w.wo), cache_k, cache_v


def decode_weights(model: Llama, dtype) -> DecodeWeights:
    layers = jax.tree.map(lambda a: a.astype(dtype), model.layers)
    head = model.embed.T if model.lm_head is None else model.lm_head
    return DecodeWeights(
        embed=model.embed.astype(dtype),
        layers=tuple(jax.tree.map(lambda a: a[i], layers) for i in range(model.config.num_layers)),
        final_norm=model.final_norm.astype(dtype),
        head=head.astype(dtype))


def _pad_slots(cache: jax.Array, axis: int, window: int) -> jax.Array:
    """The cache with empty slots appended up to `window`."""
    return jnp.pad(cache, [(0, window - cache.shape[axis]) if a == axis else (0, 0) for a in range(cache.ndim)])


def _local_replica(model: Llama, sharding: NamedSharding) -> Llama:
    """A full copy of the params on this host's devices. Arrays sharded across hosts are all-gathered first
    (a collective every host runs, before any decoding)."""
    def local(x):
        if not x.is_fully_addressable:
            x = x.addressable_data(0) if x.is_fully_replicated else multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, sharding)
    return jax.tree.map(local, model)


def _to_host(x: jax.Array) -> np.ndarray:
    # Replicated in global_mesh mode: this host's copy is the whole value.
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
