"""One SimPO optimizer step: microbatched gradients (lax.scan), AdamW with warmup + cosine, global-norm clipping.

The whole step is one jax.jit over the state's arrays with explicit shardings (parallel.mesh) and the state donated,
so params and optimizer state are updated in place on their devices and the step compiles once per run.
Params and optimizer state stay float32; the forward/backward runs in the configured compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from simpo_worker.contract.config import OptimizerConfig, SimpoConfig
from simpo_worker.model.llama import PLAIN, Llama, MemoryOptions
from simpo_worker.parallel.jit import counted_jit
from simpo_worker.parallel.mesh import batch_sharding, state_shardings
from simpo_worker.train.loss import batch_loss

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BATCH_FIELDS = ("tokens", "loss_mask", "lengths")


class TrainState(eqx.Module):
    model: Llama
    opt_state: Any
    # Optimizer steps completed (the learning-rate schedule's position).
    step: jax.Array


def make_optimizer(config: OptimizerConfig, num_train_steps: int):
    """AdamW (no decay on norm weights), linear warmup from 0 then cosine to lr * min_lr_ratio; clip first."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        # optax needs a non-empty cosine phase even when warmup takes the whole run.
        decay_steps=max(num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    clip = [] if config.max_grad_norm is None else [optax.clip_by_global_norm(config.max_grad_norm)]
    return optax.chain(*clip, adamw), schedule


def decay_mask(params: Llama) -> Llama:
    mask = jax.tree.map(lambda _: True, params)
    return eqx.tree_at(lambda m: (m.layers.attn_norm, m.layers.mlp_norm, m.final_norm), mask,
                       (False, False, False))


def is_state_array(leaf) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def init_state(model: Llama, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(model=model, opt_state=optimizer.init(eqx.filter(model, eqx.is_array)),
                      step=jnp.zeros((), jnp.int32))


def init_sharded_state(params: Llama, optimizer: optax.GradientTransformation, shardings: TrainState):
    """The state's arrays made on their shardings (CompiledStep.state_shardings) under jit: the optimizer state is
    created where it lives, never whole on one device, and `params` (already on their shardings) are donated
    into the state."""
    init = jax.jit(lambda params: eqx.filter(init_state(params, optimizer), eqx.is_array),
                   out_shardings=shardings, donate_argnums=0)
    return init(params)


def simpo_step(state: TrainState, batch: dict[str, jax.Array], optimizer: optax.GradientTransformation,
               schedule: Callable, simpo: SimpoConfig, compute_dtype,
               memory: MemoryOptions = PLAIN) -> tuple[TrainState, dict[str, jax.Array]]:
    """The pure step. batch arrays have a leading microbatch axis: [M, pairs, ...]."""
    microbatches = batch["tokens"].shape[0]

    def loss_fn(model, micro):
        return batch_loss(model, micro["tokens"], micro["loss_mask"], micro["lengths"], simpo, compute_dtype,
                          memory)

    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro):
        grads_sum, metrics_sum = carry
        (_, metrics), grads = grad_fn(state.model, micro)
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

    params = eqx.filter(state.model, eqx.is_array)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    zero_metrics = jax.tree.map(jnp.zeros_like,
                                jax.eval_shape(lambda: loss_fn(state.model, jax.tree.map(lambda x: x[0], batch))[1]))
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), batch)
    # Every microbatch holds the same number of pairs, so the mean of microbatch means is the batch mean.
    grads = jax.tree.map(lambda g: g / microbatches, grads)
    metrics = {name: value if name == "tokens" else value / microbatches for name, value in metrics.items()}
    with jax.named_scope("optimizer"):
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
    return TrainState(model=model, opt_state=opt_state, step=state.step + 1), metrics


class CompiledStep:
    """simpo_step jitted over (state arrays, batch) with explicit shardings; the state is donated.

    `compilations` counts traces (a trace precedes every compile), for the no-recompilation checks; `program` is
    the counted jit itself (`program.lower(...)` lowers the step without running it). `memory`: remat, blockwise
    attention and chunked logits (`MemoryOptions.from_config(config.trainer)`; the default is the trainer
    config's default), resolved for the platform of the mesh's devices.
    """

    def __init__(self, state: TrainState, mesh: Mesh, optimizer, schedule, simpo: SimpoConfig, compute_dtype: str,
                 memory: MemoryOptions = MemoryOptions()):
        self.memory = memory.resolve(mesh.devices.flat[0].platform)
        # Abstract leaves (jax.ShapeDtypeStruct) count as arrays too: the trainer builds the step from the state's
        # shapes before any state exists (and `simpo-interleave plan` lowers it for a slice it does not have).
        arrays, self.static = eqx.partition(state, is_state_array)
        self.state_shardings = state_shardings(arrays, mesh)
        self.batch_sharding = batch_sharding(mesh)
        dtype = COMPUTE_DTYPES[compute_dtype]

        def train_step(arrays, batch):
            # The mesh in context while tracing: the model pins its activations' layout to it (constrain_batch).
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                new_state, metrics = simpo_step(eqx.combine(arrays, self.static), batch, optimizer, schedule,
                                                simpo, dtype, self.memory)
            return eqx.filter(new_state, eqx.is_array), metrics

        self.program = counted_jit(train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, None), donate_argnums=0)

    @property
    def compilations(self) -> int:
        return self.program.compilations

    def __call__(self, arrays, batch: dict[str, jax.Array]):
        return self.program(arrays, batch)
