"""The training half of the worker: live sharded state, the next global batch, one compiled step, checkpoints.

The interleaved loop drives it: `train_step()` advances one optimizer step; `model` is the live params (the
inference engine reads these directly); `save_checkpoint()` / `restore_latest()` make and find durable state.
The state arrays are donated to every step, so read `model` again after each step rather than keeping it.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import numpy as np

from simpo_worker.checkpoint import Checkpointer, CheckpointInfo, latest_step
from simpo_worker.config import WorkerConfig
from simpo_worker.errors import ConfigError
from simpo_worker.mesh import host_rows, make_mesh, place
from simpo_worker.model import Llama
from simpo_worker.storage import join
from simpo_worker.preference_data import PreferenceData
from simpo_worker.train_step import BATCH_FIELDS, CompiledStep, init_state, make_optimizer


class Trainer:
    def __init__(self, config: WorkerConfig, model: Llama, tokenizer, mesh=None):
        trainer = config.trainer
        self.config = config
        self.mesh = make_mesh(trainer.mesh) if mesh is None else mesh
        trainer.check_batch_split(self.mesh.shape["data"], self.mesh.shape["fsdp"])
        self.pairs_per_microbatch = trainer.batch_size // trainer.microbatches

        optimizer, schedule = make_optimizer(config.optimizer, trainer.num_train_steps)
        state = init_state(model, optimizer)
        self._step_fn = CompiledStep(state, self.mesh, optimizer, schedule, config.simpo, trainer.compute_dtype)
        self._arrays = place(eqx.filter(state, eqx.is_array), self._step_fn.state_shardings)
        del state, model  # the host copies; the placed arrays are the state from here on

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
    def train_step_compilations(self) -> int:
        return self._step_fn.compilations

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        local = self.data.batch(self.data_position, self._host_rows)
        microbatches = self.config.trainer.microbatches
        batch = {}
        for name in BATCH_FIELDS:
            rows = getattr(local, name).reshape(microbatches, -1, *getattr(local, name).shape[1:])
            global_shape = (microbatches, self.pairs_per_microbatch, *rows.shape[2:])
            batch[name] = jax.make_array_from_process_local_data(self._step_fn.batch_sharding, rows, global_shape)
        self._arrays, metrics = self._step_fn(self._arrays, batch)
        metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
        self.step += 1
        self.data_position += 1
        return {"step": self.step, **metrics, "step_time": time.perf_counter() - started}

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self._arrays, CheckpointInfo(step=self.step, data_position=self.data_position,
                                                            seed=self.config.trainer.seed))

    def restore_latest(self) -> int | None:
        step = latest_step(self.checkpointer.directory)
        if step is None:
            return None
        arrays, info = self.checkpointer.restore(step, self._arrays, self._step_fn.state_shardings)
        if info.seed != self.config.trainer.seed:
            raise ConfigError(f"trainer.seed: {self.config.trainer.seed} differs from the seed {info.seed} of the "
                              f"checkpoint at step {step} in {self.checkpointer.directory}; the data order would "
                              f"change mid-run")
        self._arrays, self.step, self.data_position = arrays, info.step, info.data_position
        return step
