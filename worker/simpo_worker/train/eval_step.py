"""Held-out evaluation: the SimPO loss and reward metrics of the live params on one global batch of held-out
pairs, forward only: no gradients, nothing donated, the training state unchanged.

The program mirrors the train step (train_step.CompiledStep): the same mesh, param and batch shardings, the batch
as [microbatches, pairs, ...] run one microbatch at a time (lax.scan), the same memory options, and the per-pair
terms of the train step's own loss (simpo_loss.batch_sums). It returns sums and the count of real pairs, so the
sums of every batch over the count of every batch are the means over the whole held-out set, padding aside. Its
peak memory is below the train step's (no gradients, no backward activations), so what trains also evaluates.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from simpo_worker.contract.config import SimpoConfig
from simpo_worker.model.llama import PLAIN, Llama, MemoryOptions
from simpo_worker.parallel.jit import counted_jit
from simpo_worker.parallel.mesh import batch_sharding, state_shardings
from simpo_worker.train.loss import batch_sums
from simpo_worker.train.step import BATCH_FIELDS, COMPUTE_DTYPES, is_state_array

EVAL_FIELDS = (*BATCH_FIELDS, "pair_mask")


def eval_sums(model: Llama, batch: dict[str, jax.Array], simpo: SimpoConfig, compute_dtype,
              memory: MemoryOptions = PLAIN) -> dict[str, jax.Array]:
    """batch_sums over every microbatch of `batch` (arrays [M, pairs, ...], EVAL_FIELDS)."""

    def micro_sums(micro):
        return batch_sums(model, micro["tokens"], micro["loss_mask"], micro["lengths"], micro["pair_mask"], simpo,
                          compute_dtype, memory)

    def accumulate(totals, micro):
        return jax.tree.map(jnp.add, totals, micro_sums(micro)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_sums, jax.tree.map(lambda x: x[0], batch)))
    totals, _ = jax.lax.scan(accumulate, zero, batch)
    return totals


class CompiledEval:
    """eval_sums jitted over (param arrays, batch) with the train step's shardings; `compilations` counts traces.

    `model` may hold arrays or jax.ShapeDtypeStructs (the trainer builds it from the state's shapes)."""

    def __init__(self, model: Llama, mesh: Mesh, simpo: SimpoConfig, compute_dtype: str,
                 memory: MemoryOptions = MemoryOptions()):
        memory = memory.resolve(mesh.devices.flat[0].platform)
        arrays, self.static = eqx.partition(model, is_state_array)
        dtype = COMPUTE_DTYPES[compute_dtype]

        def evaluate(arrays, batch):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return eval_sums(eqx.combine(arrays, self.static), batch, simpo, dtype, memory)

        self.program = counted_jit(evaluate, in_shardings=(state_shardings(arrays, mesh), batch_sharding(mesh)))

    @property
    def compilations(self) -> int:
        return self.program.compilations

    def __call__(self, arrays, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self.program(arrays, batch)
