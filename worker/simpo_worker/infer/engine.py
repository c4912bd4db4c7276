"""Batched generation from the live model: the host side (waves, buckets, compaction, progress, placement) of
the jitted programs in decode.py.

How a call runs:
- The prompts are cut into waves of at most `inference.batch_size` slots. A wave is right-padded to a length
  bucket and prefilled in one forward; then a `lax.while_loop` decodes up to `CHUNK_STEPS` tokens per call and
  stops early once every sequence has finished. Between chunks the host only reads a few flags (and reports
  progress); with inference.stop_tokens it also reads the new tokens, and a row whose text now holds a stop string
  is marked finished as on EOS (stop_strings.py). A wave ends when its longest sequence ends. Once at most half of
  its rows still decode, the finished rows' results are kept and the batch is compacted to the next smaller bucket
  (cache rows included), so a long tail costs the compute and memory of its own rows, not of the whole wave.
  Waves, not continuous refill: `row_steps` counts the batch rows x steps run, so generated tokens / row_steps
  bounds what refilling finished slots could win back (bench/README.md has the measured share), and in the
  reference workflow each host holds a single wave anyway.
- Every shape is bucketed (batch: power of two up to batch_size; prompt length: multiples of PROMPT_BUCKET;
  attention window: see WINDOW_BUCKET), so a second call with similar prompts compiles nothing.
  `compilations` counts traces of the engine's jitted programs.
- The cache slot of a token is its position. The cache holds only the attention window the current chunk
  needs and grows between chunks, so early steps do not pay for attention over the full `prompt + max_new_tokens`.

Placements (inference.mode):
- host_data_parallel: the params are cast to the compute dtype where they lie, then copied once per call to a
  replica on this host's local mesh, data x model with inference.tensor_parallel devices on `model` (gathered
  first if training sharded them across hosts): each replica split Megatron-style over `model` (layout.PARAM_AXES),
  the batch split over `data`, and decoding uses no cross-host communication. Each host passes its own shard of
  the prompts.
- global_mesh: the params stay as the trainer sharded them on the global mesh (fsdp and model); every host passes
  the same prompts and runs the same programs in the same order (the host loop branches only on replicated
  values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.contract.config import ArchitectureConfig, InferenceConfig
from simpo_worker.contract.errors import ConfigError, DataError
from simpo_worker.data.tokenizer import Tokenizer
from simpo_worker.infer import decode
from simpo_worker.infer.decode import DecodeSpec, DecodeWeights, decode_weights
from simpo_worker.infer.sampling import SamplingParams
from simpo_worker.infer.stop_strings import StopStringMatcher
from simpo_worker.model.llama import Llama
from simpo_worker.parallel.mesh import state_shardings

# Decode steps per jitted call: the host checks for "all finished" and reports progress this often.
CHUNK_STEPS = 64
PROMPT_BUCKET = 64
# The attention window grows in steps of WINDOW_BUCKET slots, or of WINDOW_ROW_SLOTS / batch rows if more: each
# window size compiles the decode loop again, while a step reads its whole window. A large batch wants fine steps
# (its cache is large, and unused slots are read every step); a small one (a compacted tail) has a small cache and
# would spend its time compiling, so it takes coarser steps.
WINDOW_BUCKET = 128
WINDOW_ROW_SLOTS = 2048


@dataclass
class Completion:
    global_prompt_index: int
    # Generated tokens, including the stop token when finish_reason is "stop" (as HF generate and vLLM), or the
    # token that completed a stop string.
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    # The text of token_ids (special tokens left out), ending with the stop string if one stopped the row
    # (stop_strings.py); None from an engine without a tokenizer.
    text: Optional[str] = None


@dataclass(frozen=True)
class WaveShapes:
    """A wave's batch rows, padded prompt length, and the cache windows it decodes at: (slots, decode steps run
    with that many slots), in the order the cache grows through them. windows[0][0] is the prefill's window."""

    slots: int
    prompt_length: int
    windows: tuple[tuple[int, int], ...]

    @property
    def full_window(self) -> int:
        return self.windows[-1][0]


class Engine:
    def __init__(self, arch: ArchitectureConfig, inference: InferenceConfig, eos_token_ids: list[int],
                 compute_dtype=jnp.float32, mesh: Optional[Mesh] = None, local_devices: Optional[list] = None,
                 tokenizer: Optional[Tokenizer] = None):
        """`local_devices`: this host's devices (default jax.local_devices()); `simpo-interleave plan` passes
        one host's devices of the slice it compiles for. `tokenizer`: gives completions their text, and is
        needed for inference.stop_tokens."""
        self.arch = arch
        self.inference = inference
        self.compute_dtype = compute_dtype
        if inference.stop_tokens and tokenizer is None:
            raise ConfigError("inference.stop_tokens: stop strings need the engine to have the tokenizer")
        self.tokenizer = tokenizer
        stop_ids = tuple(sorted(set(eos_token_ids)))
        if not stop_ids and not inference.ignore_eos:
            raise ConfigError("inference: no EOS / stop token ids for the engine; set ignore_eos or give the "
                              "tokenizer's end-of-generation ids")
        if inference.mode == "global_mesh":
            if mesh is None:
                raise ConfigError("inference.mode: global_mesh needs the training mesh")
            batch_spec = P()  # every host holds the whole (identical) batch
            self.batch_multiple = 1
        else:
            local_devices = jax.local_devices() if local_devices is None else list(local_devices)
            inference.check_host_devices(len(local_devices))
            # data x model over this host's devices: `model` splits each replica (layout.PARAM_AXES), `data` the batch.
            mesh = Mesh(np.array(local_devices).reshape(-1, inference.tensor_parallel), ("data", "model"))
            batch_spec = P("data")
            self.batch_multiple = mesh.shape["data"]
        self.mesh = mesh
        self.spec = DecodeSpec(arch=arch, sampling=SamplingParams.from_config(inference),
                               max_new_tokens=inference.max_new_tokens, stop_ids=stop_ids,
                               ignore_eos=inference.ignore_eos, mesh=mesh, batch_spec=batch_spec)
        self.max_slots = _round_up(inference.batch_size, self.batch_multiple)
        # The engine's own copies of the programs: its compile count (and compile time) does not depend on what
        # else ran in the process.
        self._prefill = decode.prefill.fresh()
        self._decode = decode.decode_chunk.fresh()
        self._grow = decode.grow_window.fresh()
        self._compact = decode.compact.fresh()
        self.compactions = 0  # batches shrunk mid-wave (finished rows dropped)
        self.window_growths = 0  # caches grown mid-wave (a larger attention window)
        # Batch rows x sampling steps run, empty and finished rows included: generated tokens / row_steps is the
        # share of the work that produced kept tokens (what continuous refill of finished slots could raise).
        self.row_steps = 0

    # ---- public ----------------------------------------------------------------------------------------

    @property
    def compilations(self) -> int:
        """Traces of the engine's jitted programs (a trace precedes every compile)."""
        return sum(program.compilations for program in (self._prefill, self._decode, self._grow, self._compact))

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
        # Before any early return: gathering params sharded across hosts is a collective every host must join,
        # also a host whose shard of the prompts is empty.
        weights = self.placed_weights(model)
        if not prompts:
            return []
        completions: list[Completion] = []
        start = 0
        while start < len(prompts):
            slots = self._wave_slots(len(prompts) - start)
            wave = slice(start, min(start + slots, len(prompts)))
            finished, tokens_before = len(completions), sum(len(c.token_ids) for c in completions)

            def wave_progress(done: int, tokens: int) -> None:
                if progress is not None:
                    progress(finished + done, tokens_before + tokens)

            completions += Wave(self, weights, prompts[wave], global_indices[wave], slots, step, seed).run(
                wave_progress)
            start = wave.stop
        return completions

    def largest_wave(self, prompt_count: Optional[int]) -> "WaveShapes":
        """The shapes of the largest wave a call with `prompt_count` prompts runs (None: unknown, enough to fill
        a wave) when every prompt has max_prompt_len tokens and none stops before max_new_tokens: the programs
        `simpo-interleave plan` compiles, from the same bucketing rules as the host loop below."""
        inf = self.inference
        slots = self._wave_slots(self.max_slots if prompt_count is None else max(prompt_count, 1))
        longest = inf.max_prompt_len
        window = self._window(longest, min(CHUNK_STEPS, inf.max_new_tokens), slots)
        windows = [[window, 0]]
        generated = 1  # the prefill samples the first token
        while generated < inf.max_new_tokens:
            stop_at = min(generated + CHUNK_STEPS, inf.max_new_tokens)
            window = max(window, self._window(longest, stop_at, slots))
            if window != windows[-1][0]:
                windows.append([window, 0])
            windows[-1][1] += stop_at - generated
            generated = stop_at
        return WaveShapes(slots=slots, prompt_length=_round_up(longest, PROMPT_BUCKET),
                          windows=tuple((w, steps) for w, steps in windows))

    # ---- host side -------------------------------------------------------------------------------------

    def _wave_slots(self, remaining: int) -> int:
        return min(self.max_slots, _round_up(1 << (remaining - 1).bit_length(), self.batch_multiple))

    def _window(self, longest_prompt: int, generated_by: int, rows: int) -> int:
        """Cache slots needed until `generated_by` tokens exist (the last one fed sits at position
        prompt + generated_by - 2; the final token is sampled, never fed), rounded up to the window bucket of a
        batch of `rows` and capped at what the whole request can use."""
        bucket = _round_up(max(WINDOW_BUCKET, WINDOW_ROW_SLOTS // rows), WINDOW_BUCKET)
        whole_request = _round_up(longest_prompt + self.inference.max_new_tokens - 1, WINDOW_BUCKET)
        return min(_round_up(longest_prompt + generated_by - 1, bucket), whole_request)

    def place(self, array: np.ndarray, spec: Optional[P] = None) -> jax.Array:
        """Host data (identical on every host in global_mesh mode) onto the engine's batch sharding."""
        sharding = NamedSharding(self.mesh, self.spec.batch_spec if spec is None else spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def placed_weights(self, model: Llama) -> DecodeWeights:
        """`model`'s weights as decoding uses them: in the compute dtype, laid out on this engine's mesh."""
        if self.inference.mode == "host_data_parallel":
            # Cast where the params lie, then gather and copy: the replica moves compute-dtype bytes (half of
            # float32's in bfloat16), and no float32 replica ever exists on the inference devices.
            model = local_replica(_cast(model, self.compute_dtype), self.mesh)
        weights = decode_weights(model, self.compute_dtype)
        return jax.device_put(weights, decode.weight_shardings(weights, self.arch, self.mesh))


class Wave:
    """One wave of prompts decoded together, in named steps: `__init__` prefills; then, chunk by chunk, `observe`
    (the host reads the flags and applies stop strings), `report` (progress), `shrink` (compaction once at most half
    the rows still decode), `fit_window` (the cache grown for the next chunk) and `decode`; `finish` collects the
    completions in prompt order. The engine holds the programs, the buckets and the counters."""

    def __init__(self, engine: Engine, weights: DecodeWeights, prompts: list[list[int]], indices: list[int],
                 slots: int, step: int, seed: int):
        self.engine, self.weights, self.indices = engine, weights, indices
        inf = engine.inference
        self.n = n = len(prompts)
        self.longest = longest = max(len(p) for p in prompts)
        length = _round_up(longest, PROMPT_BUCKET)
        tokens = np.zeros((slots, length), np.int32)
        lengths = np.ones((slots,), np.int32)  # empty slots: a one-token dummy prompt, done from the start
        global_index = np.zeros((slots,), np.int32)
        for row, (prompt, index) in enumerate(zip(prompts, indices)):
            tokens[row, :len(prompt)] = prompt
            lengths[row] = len(prompt)
            global_index[row] = index
        active = np.arange(slots) < n

        self.window = engine._window(longest, min(CHUNK_STEPS, inf.max_new_tokens), slots)
        put = engine.place
        self.state = engine._prefill(engine.spec, weights, put(tokens), put(lengths), put(global_index), put(active),
                                     jnp.int32(step), jnp.int32(seed), window=self.window)
        self.rows = np.arange(slots)  # the wave row (prompt) that each batch row holds
        self.matchers = ([StopStringMatcher(engine.tokenizer, inf.stop_tokens) for _ in range(n)]
                         if inf.stop_tokens else [])
        self.results: dict[int, Completion] = {}
        self.stepped_rows, self.stepped_from = slots, 0  # the prefill sampled one token in every slot

    def run(self, progress: Callable[[int, int], None]) -> list[Completion]:
        while True:
            generated, done, counts = self.observe()
            self.report(progress, done, counts)
            if done.all():
                break
            self.shrink(done)
            stop_at = min(generated + CHUNK_STEPS, self.engine.inference.max_new_tokens)
            self.fit_window(stop_at)
            self.decode(generated, stop_at)
        return self.finish()

    def observe(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(tokens generated so far, each batch row's done flag, its token count) on the host, after stop strings;
        the steps the last chunk ran are added to the engine's row_steps."""
        state = self.state
        generated, done, counts = _to_host(state.generated), _to_host(state.done), _to_host(state.counts)
        self.engine.row_steps += self.stepped_rows * (int(generated) - self.stepped_from)
        if self.matchers:
            done, counts = self._stop_on_strings(done, counts)
        return int(generated), done, counts

    def report(self, progress: Callable[[int, int], None], done: np.ndarray, counts: np.ndarray) -> None:
        """progress(prompts done, tokens generated), the collected rows' and the batch's together."""
        real = self.rows < self.n
        held = set(self.rows[real].tolist())
        progress(len(set(self.results) - held) + int((done & real).sum()),
                 sum(len(c.token_ids) for r, c in self.results.items() if r not in held) + int(counts[real].sum()))

    def shrink(self, done: np.ndarray) -> None:
        """Once at most half the rows still decode: keep the finished ones' results and go on with a smaller batch
        (finished rows would otherwise cost a full row of compute and cache every step)."""
        live = np.flatnonzero(~done)
        smaller = self.engine._wave_slots(len(live))
        if smaller >= len(self.rows):
            return
        self._collect(done & (self.rows < self.n))
        keep = np.concatenate([live, np.flatnonzero(done)[:smaller - len(live)]]).astype(np.int32)
        self.state = self.engine._compact(self.engine.spec, self.state, self.engine.place(keep, P()))
        self.engine.compactions += 1
        self.rows = self.rows[keep]

    def fit_window(self, stop_at: int) -> None:
        """The cache grown to the window the next chunk needs, if it needs more."""
        needed = self.engine._window(self.longest, stop_at, len(self.rows))
        if needed > self.window:
            self.state = self.engine._grow(self.state, needed)
            self.window = needed
            self.engine.window_growths += 1

    def decode(self, generated: int, stop_at: int) -> None:
        """One chunk: decode steps until `stop_at` tokens exist or every row is done."""
        self.stepped_rows, self.stepped_from = len(self.rows), generated
        self.state = self.engine._decode(self.engine.spec, self.weights, self.state, jnp.int32(stop_at))

    def finish(self) -> list[Completion]:
        self._collect(self.rows < self.n)
        return [self.results[row] for row in range(self.n)]

    def _stop_on_strings(self, done: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feeds each row's new tokens to its matcher. A row whose text now holds a stop string ends at the token
        that completed it (tokens after it in the chunk are dropped) and is marked done and stopped on the
        device, so it leaves the batch as on EOS. In global_mesh mode every host computes the same marks from the
        same (replicated) tokens."""
        state, rows = self.state, self.rows
        out = _to_host(state.out)
        hit = np.zeros(len(rows), bool)
        counts = counts.copy()
        for b in np.flatnonzero(rows < self.n):
            matcher = self.matchers[rows[b]]
            if matcher.text_end is None and matcher.feed(out[b, matcher.tokens:counts[b]].tolist()):
                hit[b] = True
                counts[b] = matcher.tokens
        if not hit.any():
            return done, counts
        done, stopped = done | hit, _to_host(state.stopped) | hit
        place = self.engine.place
        self.state = eqx.tree_at(lambda s: (s.counts, s.done, s.stopped), state,
                                 (place(counts), place(done), place(stopped)))
        return done, counts

    def _collect(self, mask: np.ndarray) -> None:
        """Completions of the batch rows in `mask`, keyed by their wave row."""
        state, tokenizer = self.state, self.engine.tokenizer
        out, counts, stopped = _to_host(state.out), _to_host(state.counts), _to_host(state.stopped)
        for b in np.flatnonzero(mask):
            row = int(self.rows[b])
            token_ids = out[b, :counts[b]].tolist()
            text = None if tokenizer is None else tokenizer.decode(token_ids, skip_special_tokens=True)
            if self.matchers and self.matchers[row].text_end is not None:
                text = text[:self.matchers[row].text_end]
            self.results[row] = Completion(global_prompt_index=int(self.indices[row]), token_ids=token_ids,
                                           finish_reason="stop" if stopped[b] else "length", text=text)


def _cast(model: Llama, dtype) -> Llama:
    """The params in `dtype`, each keeping its sharding (a no-op for arrays already in it)."""
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), model)


def local_replica(model: Llama, mesh: Mesh) -> Llama:
    """A copy of the params on this host's local mesh, each laid out by layout.PARAM_AXES (split over `model`,
    replicated over `data`). Arrays sharded across hosts are all-gathered first, one at a time (a collective every
    host runs, before any decoding)."""
    def local(x, sharding):
        if not x.is_fully_addressable:
            x = x.addressable_data(0) if x.is_fully_replicated else multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, sharding)
    return jax.tree.map(local, model, state_shardings(model, mesh))


def _to_host(x: jax.Array) -> np.ndarray:
    # Replicated in global_mesh mode: this host's copy is the whole value.
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
