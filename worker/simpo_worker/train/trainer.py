"""The training half of the worker: live sharded state, the next global batch, one compiled step, checkpoints.

The interleaved loop drives it: `train_step()` advances one optimizer step; `evaluate()` scores the live params on
held-out pairs without changing anything; `model` is the live params (the inference engine reads these directly);
`save_checkpoint()` (asynchronous: `wait_for_checkpoint()` makes it durable) / `restore_latest()` make and find
durable state.
The state arrays are donated to every step, so read `model` again after each step rather than keeping it.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import numpy as np

from simpo_worker.contract.config import WorkerConfig
from simpo_worker.contract.errors import ConfigError
from simpo_worker.data.preference_data import PreferenceBatch, PreferenceData
from simpo_worker.model.llama import Llama, MemoryOptions
from simpo_worker.parallel.distributed import barrier
from simpo_worker.parallel.mesh import host_rows, make_mesh, place
from simpo_worker.store.storage import join
from simpo_worker.train.checkpoint import CheckpointInfo, Checkpointer
from simpo_worker.train.eval_step import EVAL_FIELDS, CompiledEval
from simpo_worker.train.step import BATCH_FIELDS, CompiledStep, init_sharded_state, init_state, make_optimizer


class Trainer:
    def __init__(self, config: WorkerConfig, model: Llama, tokenizer, mesh=None):
        trainer = config.trainer
        self.config = config
        self.mesh = make_mesh(trainer.mesh) if mesh is None else mesh
        trainer.check_batch_split(self.mesh.shape["data"], self.mesh.shape["fsdp"])
        self.pairs_per_microbatch = trainer.batch_size // trainer.microbatches

        optimizer, schedule = make_optimizer(config.optimizer, trainer.num_train_steps)
        abstract = jax.eval_shape(lambda model: init_state(model, optimizer), model)
        memory = MemoryOptions.from_config(trainer)
        self._step_fn = CompiledStep(abstract, self.mesh, optimizer, schedule, config.simpo, trainer.compute_dtype,
                                     memory)
        self._eval_fn = CompiledEval(abstract.model, self.mesh, config.simpo, trainer.compute_dtype, memory)
        shardings = self._step_fn.state_shardings
        # The params on their shardings (a no-op for a model loaded onto this mesh, pretrained.load_model(.., mesh));
        # the optimizer state is made under jit with its shardings, the params donated into the state.
        params = jax.tree.map(_on_sharding, eqx.filter(model, eqx.is_array), shardings.model)
        del model
        self._arrays = init_sharded_state(params, optimizer, shardings)
        del params

        self.data = PreferenceData(config.data, tokenizer, config.data.train_files, trainer.batch_size,
                                   trainer.seed)
        # This host's rows of every global batch: its slice of each microbatch.
        mine = host_rows(self.mesh, trainer.microbatches, self.pairs_per_microbatch)
        self._host_rows = np.concatenate([m * self.pairs_per_microbatch + np.arange(mine.start, mine.stop)
                                          for m in range(trainer.microbatches)])
        self.checkpointer = Checkpointer(join(config.output_dir, "checkpoints"), trainer.checkpoint.keep,
                                         config.distributed.barrier_timeout_s)
        self.step = 0
        self.data_position = 0

    @property
    def model(self) -> Llama:
        return eqx.combine(self._arrays, self._step_fn.static).model

    @property
    def state(self):
        """The train state's arrays (params, optimizer state, step count), each on its sharding."""
        return self._arrays

    @property
    def memory(self) -> MemoryOptions:
        """How the compiled train step trades compute for memory (trainer.remat, attention, loss_chunk_tokens)."""
        return self._step_fn.memory

    @property
    def train_step_compilations(self) -> int:
        return self._step_fn.compilations

    @property
    def eval_compilations(self) -> int:
        return self._eval_fn.compilations

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        batch = self._global_batch(self.data.batch(self.data_position, self._host_rows), BATCH_FIELDS)
        self._arrays, metrics = self._step_fn(self._arrays, batch)
        metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
        self.step += 1
        self.data_position += 1
        return {"step": self.step, **metrics, "step_time": time.perf_counter() - started}

    def evaluate(self, held_out: PreferenceData) -> dict[str, float]:
        """The train step's metrics for the live params, as means over every pair of `held_out`; `pairs` counts
        them. The pairs go in file order, in global batches of trainer.batch_size laid out as the train step's
        (each host tokenizes only its rows); the last batch is filled up with padding rows that count nowhere, so
        the means are exact. Every host runs every batch, padding alone if need be: the same collectives on all.
        Nothing is donated or updated."""
        batch_size = self.config.trainer.batch_size
        batches = -(-len(held_out.pairs) // batch_size)
        totals: dict[str, float] = {}
        for position in range(batches):
            local = held_out.held_out_batch(position * batch_size, self._host_rows)
            sums = jax.device_get(self._eval_fn(self._arrays.model, self._global_batch(local, EVAL_FIELDS)))
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)  # float64 across batches
        pairs, tokens = int(totals.pop("pairs")), int(totals.pop("tokens"))
        return {**{name: total / pairs for name, total in totals.items()}, "tokens": tokens, "pairs": pairs}

    def _global_batch(self, local: PreferenceBatch, fields: tuple[str, ...]) -> dict[str, jax.Array]:
        """This host's rows as the global [microbatches, pairs, ...] arrays on the batch sharding."""
        microbatches = self.config.trainer.microbatches
        batch = {}
        for name in fields:
            rows = getattr(local, name).reshape(microbatches, -1, *getattr(local, name).shape[1:])
            global_shape = (microbatches, self.pairs_per_microbatch, *rows.shape[2:])
            batch[name] = jax.make_array_from_process_local_data(self._step_fn.batch_sharding, rows, global_shape)
        return batch

    def save_checkpoint(self) -> None:
        """Starts the save; training may go on at once (the write continues in the background)."""
        self.checkpointer.save(self._arrays, CheckpointInfo(step=self.step, data_position=self.data_position,
                                                            seed=self.config.trainer.seed))

    def wait_for_checkpoint(self) -> None:
        """Until the last save is committed on every host (raises its error); all hosts call it. The closing
        barrier keeps the leader, whose process hosts the coordination service, from exiting while another
        host's Orbax is still in its last barrier."""
        self.checkpointer.wait()
        barrier(f"checkpoint-{self.step}-durable", self.config.distributed.barrier_timeout_s)

    def restore_latest(self) -> int | None:
        step = self.checkpointer.latest_step()
        if step is None:
            return None
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._arrays)
        info = self.checkpointer.info(step, template)
        if info.seed != self.config.trainer.seed:
            raise ConfigError(f"trainer.seed: {self.config.trainer.seed} differs from the seed {info.seed} of the "
                              f"checkpoint at step {step} in {self.checkpointer.directory}; the data order would "
                              f"change mid-run")
        # Read straight into the state's shardings; the state it replaces goes first, so the two never coexist.
        jax.tree.map(lambda x: x.delete(), self._arrays)
        self._arrays, info = self.checkpointer.restore(step, template, self._step_fn.state_shardings)
        self.step, self.data_position = info.step, info.data_position
        return step


def _on_sharding(x, sharding):
    """x on `sharding`: as it is if already there; else resharded (an array spread over processes) or placed from
    the host copy every process holds."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    return place(x, sharding)
