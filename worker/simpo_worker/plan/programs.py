"""Compile the worker's own programs for devices this machine does not have, and read what XLA says of them.

`simpo-interleave plan` builds, from shapes alone (no weights are read), the programs a job's worker runs, at
their largest, with the worker's own code:
- `train_step`: the trainer's CompiledStep (simpo_step under jit, state donated) on trainer.mesh over every device
  of the job, for one global batch of max_seq_len tokens;
- `prefill`, `decode_grow_window`, `decode`: the engine's jitted programs (decode.py) with the Engine's own
  DecodeSpec and placement, for the largest wave its bucketing makes (Engine.largest_wave: prompts of
  max_prompt_len tokens that all run to max_new_tokens), in the order the engine runs them: the prefill at its
  first window, the last growth of the cache to the full window (old and new cache both live: no donation), and
  the decode loop at the full window. Each program gets the shardings the previous one's compile produced, as at
  run time. (`compact` is left out: its output is a smaller batch, so it needs less than the last growth.)
XLA compiles them for the target's devices: a libtpu compile-only topology (jax.experimental.topologies; the `tpu`
extra installs libtpu) or this machine's CPU devices standing in for a CPU pool's hosts.

What is reported of each (memory per chip, FLOPs, collectives): plan.report.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from simpo_worker.contract.config import ArchitectureConfig, WorkerConfig
from simpo_worker.model import flops
from simpo_worker.model.llama import MemoryOptions, init_llama
from simpo_worker.parallel.mesh import make_mesh
from simpo_worker.plan.inference import plan_inference
from simpo_worker.plan.memory import per_chip_bytes, report_program, with_shardings
from simpo_worker.plan.report import TRAIN_STEP, Plan
from simpo_worker.plan.targets import Target
from simpo_worker.train.step import COMPUTE_DTYPES, CompiledStep, init_state, make_optimizer


def plan_programs(config: WorkerConfig, arch: ArchitectureConfig, target: Target) -> Plan:
    """Compile every program of the job for `target`; see the module docstring."""
    trainer = config.trainer
    trainer.check_devices(len(target.devices), slices=target.slices)
    mesh = make_mesh(trainer.mesh, list(target.devices), target.slices)
    compute_dtype = COMPUTE_DTYPES[trainer.compute_dtype]
    step, arrays, lowered = lower_train_step(config, arch, mesh)
    params, optimizer_bytes = per_chip_bytes(arrays.model), per_chip_bytes((arrays.opt_state, arrays.step))
    # XLA compiles outside the GIL: the train step compiles on a thread while the inference programs (which need
    # none of its results) compile here, so the two longest compiles overlap on a machine with spare cores.
    with ThreadPoolExecutor(1) as pool:
        train = pool.submit(report_program, TRAIN_STEP, lowered, params=params, optimizer=optimizer_bytes,
                            kv_args=0, flop_count=flops.train_step_flops(arch, trainer.batch_size, config.data.max_seq_len))
        plan = _empty_plan(config, arch, target, mesh, compute_dtype)
        if config.inference.enabled:
            plan_inference(plan, config, arch, target, mesh, arrays.model, compute_dtype,
                           (params, optimizer_bytes))
        plan.programs.insert(0, train.result()[0])
    if step.memory.remat == "full":
        plan.train_recompute_flops = flops.layers_forward_flops(arch, trainer.batch_size, config.data.max_seq_len)
    return plan


def lower_train_step(config: WorkerConfig, arch: ArchitectureConfig, mesh: Mesh):
    """The trainer's step on `mesh`, lowered for one global batch on abstract state (init_llama and
    optimizer.init traced, never run): (the CompiledStep, the state's ShapeDtypeStructs, the Lowered)."""
    trainer = config.trainer
    optimizer, schedule = make_optimizer(config.optimizer, trainer.num_train_steps)
    state = jax.eval_shape(lambda: init_state(init_llama(arch, jax.random.key(0)), optimizer))
    step = CompiledStep(state, mesh, optimizer, schedule, config.simpo, trainer.compute_dtype,
                        MemoryOptions.from_config(trainer))
    arrays = with_shardings(eqx.filter(state, lambda x: isinstance(x, jax.ShapeDtypeStruct)),
                            step.state_shardings)
    pairs = trainer.batch_size // trainer.microbatches
    batch = {name: jax.ShapeDtypeStruct((trainer.microbatches, pairs, *shape), dtype)
             for name, shape, dtype in (("tokens", (2, config.data.max_seq_len), jnp.int32),
                                        ("loss_mask", (2, config.data.max_seq_len), jnp.float32),
                                        ("lengths", (2,), jnp.int32))}
    return step, arrays, step.program.lower(arrays, batch)


def _empty_plan(config: WorkerConfig, arch: ArchitectureConfig, target: Target, mesh: Mesh,
                compute_dtype) -> Plan:
    return Plan(programs=[], arch=arch, chips=len(target.devices), chips_per_host=len(target.host_devices),
                hosts=target.process_count, mesh_shape=dict(mesh.shape), wave=None, waves_per_pause=0, inference_devices=0, decode_weight_bytes_per_chip=0,
                compute_itemsize=jnp.dtype(compute_dtype).itemsize, inference_mode=config.inference.mode)

