"""The inference programs of a pause, planned as the engine runs them: the prefill at its first window, the last
growth of the KV cache to the full window, and the decode loop at the full window, for the largest wave the
engine's bucketing makes (see plan.programs).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_worker.contract.config import ArchitectureConfig, WorkerConfig
from simpo_worker.data.prompts import host_shard
from simpo_worker.infer import decode
from simpo_worker.infer.decode import DecodeState, decode_weights
from simpo_worker.infer.engine import Engine
from simpo_worker.model import flops
from simpo_worker.plan.memory import per_chip_bytes, report_program, with_shardings
from simpo_worker.plan.report import DECODE, GROW, PREFILL, Plan
from simpo_worker.plan.targets import Target


def _prompts_per_call(config: WorkerConfig, hosts: int) -> Optional[int]:
    """Prompts one host passes to Engine.generate at a pause (None: a prompts file, not read here)."""
    count = config.inference.synthetic_prompt_count
    if count is None:
        return None
    if config.inference.mode == "global_mesh":
        return count  # every host runs the whole, sharded computation
    return len(host_shard(count, 0, hosts))  # host 0 holds the largest shard


def plan_inference(plan: Plan, config: WorkerConfig, arch: ArchitectureConfig, target: Target, train_mesh: Mesh,
                   model_arrays, compute_dtype, resident: tuple[int, int]) -> None:
    """Compile the inference programs for `target` and add them to `plan` (with the wave they run); `resident`:
    the training params and optimizer bytes per chip that stay live beside them."""
    inference = config.inference
    # The stop ids come from the tokenizer at run time, and stop strings are matched on the host: neither changes
    # a program.
    engine = Engine(arch, dataclasses.replace(inference, stop_tokens=[]), arch.eos_token_ids or [0],
                    compute_dtype=compute_dtype, mesh=train_mesh, local_devices=list(target.host_devices))
    spec = engine.spec
    prompts = _prompts_per_call(config, target.process_count)
    wave = engine.largest_wave(prompts)
    plan.wave = wave
    plan.waves_per_pause = 1 if prompts is None else -(-prompts // wave.slots)

    # The inference weights as Engine.placed_weights lays them out on the engine's mesh (cast to the compute dtype).
    weights_shape = jax.eval_shape(partial(decode_weights, dtype=compute_dtype), model_arrays)
    weights = with_shardings(weights_shape, decode.weight_shardings(weights_shape, arch, engine.mesh))
    weight_bytes = per_chip_bytes(weights)
    plan.decode_weight_bytes_per_chip = weight_bytes
    plan.inference_devices = engine.mesh.devices.size

    rows = NamedSharding(engine.mesh, spec.batch_spec)
    scalar = NamedSharding(engine.mesh, P())
    per_row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)  # noqa: E731
    slots, length = wave.slots, wave.prompt_length
    prefill_args = (weights, per_row((slots, length), jnp.int32), per_row((slots,), jnp.int32),
                    per_row((slots,), jnp.int32), per_row((slots,), jnp.bool_),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar))
    first_window, full_window = wave.windows[0][0], wave.full_window

    def state_at(window: int, shardings) -> DecodeState:
        """The decode state at `window` slots: shapes from tracing the prefill, shardings from the program that
        made it (None: XLA refused it; then the batch sharding on every per-row array)."""
        shapes = jax.eval_shape(partial(decode.prefill.jitted, spec, window=window), *prefill_args)
        if shardings is None:
            shardings = jax.tree.map(lambda s: rows if s.ndim else scalar, shapes)
        return with_shardings(shapes, shardings)

    def kv(state: DecodeState) -> int:
        return per_chip_bytes((state.k, state.v))

    report, compiled = report_program(
        PREFILL, decode.prefill.lower(spec, *prefill_args, window=first_window), params=weight_bytes, optimizer=0,
        kv_args=0, kv_out=lambda made: kv(state_at(first_window, made)),
        flop_count=flops.prefill_flops(arch, slots, length), resident=resident)
    plan.programs.append(report)
    state_shardings = compiled.output_shardings if compiled is not None else None

    if len(wave.windows) > 1:
        before = state_at(wave.windows[-2][0], state_shardings)
        # grow_window takes no weights: they stay live beside it, resident like the training state.
        report, compiled = report_program(GROW, decode.grow_window.lower(before, window=full_window), params=0,
                                          optimizer=0, kv_args=kv(before), flop_count=0.0,
                                          kv_out=lambda made: kv(state_at(full_window, made or state_shardings)),
                                          resident=(resident[0] + weight_bytes, resident[1]))
        plan.programs.append(report)
        if compiled is not None:
            state_shardings = compiled.output_shardings
    full = state_at(full_window, state_shardings)
    stop_at = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar)
    report, _ = report_program(DECODE, decode.decode_chunk.lower(spec, weights, full, stop_at),
                               params=weight_bytes, optimizer=0, kv_args=kv(full),
                               flop_count=flops.decode_step_flops(arch, slots, full_window), resident=resident)
    plan.programs.append(report)
