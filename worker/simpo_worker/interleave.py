"""The interleaved run: train on the global mesh, pause at scheduled steps to sample the live policy on every
host, then resume training from the in-memory state.

A pause at step s (after optimizer step s):
  1. checkpoint (the state is durable: a crash during inference restarts here, not from scratch); the save is
     asynchronous, its write overlaps the rest of the pause (and training after it) until the next save waits
  2. barrier; with export.at `pauses`, the live params exported to Hugging Face format (export.py); with
     data.eval_files, every host evaluates the live params on the held-out pairs (trainer.evaluate:
     the train step's loss and reward metrics, forward only, on the training mesh)
  3. each host generates its shard of the prompts from the live params (host_data_parallel: a replica on the
     host's own devices; global_mesh: the sharded params) and writes its JSONL atomically
  4. small per-host stats gathered to the leader; the leader checks coverage, writes manifest.json last, then the
     pause's metrics records (eval, inference) and a sample of the completions to the trackers
  5. barrier; training continues with the same params, optimizer state, data position and compiled step

On restart the worker resumes from the newest complete checkpoint. An inference step whose manifest exists is
not redone; one without is redone whole (the per-prompt PRNG keys make the result the same).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from simpo_worker.contract.api import Progress
from simpo_worker.contract.config import InferenceConfig, WorkerConfig
from simpo_worker.contract.errors import ConfigError
from simpo_worker.data.preference_data import PreferenceData
from simpo_worker.data.prompts import PromptSet, host_shard, load_prompts
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.infer.engine import Completion, Engine
from simpo_worker.observe import logs
from simpo_worker.observe.profiling import Profiler
from simpo_worker.observe.progress import ProgressReporter, reporter_from_env
from simpo_worker.observe.trackers import SAMPLES_PER_HOST, Trackers, open_trackers
from simpo_worker.parallel.compile_cache import CompileLog
from simpo_worker.parallel.distributed import barrier, is_leader, num_slices
from simpo_worker.parallel.mesh import make_mesh
from simpo_worker.preemption import Preempted, TerminationNotice
from simpo_worker.store import outputs, storage
from simpo_worker.train.step import COMPUTE_DTYPES
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.export import export_dir, export_hf, tokenizer_files
from simpo_worker.weights.pretrained import load_model

log = logging.getLogger(__name__)


class InterleavedRun:
    def __init__(self, config: WorkerConfig, trainer: Trainer, engine: Engine, prompts: PromptSet,
                 reporter: ProgressReporter, trackers: Trackers, held_out: PreferenceData | None = None,
                 notice: TerminationNotice | None = None, compiles: CompileLog | None = None,
                 export_files: dict[str, bytes] | None = None):
        self.config = config
        # The tokenizer's files for every Hugging Face copy (read once, at start).
        self.export_files = export_files or {}
        self.trainer = trainer
        self.engine = engine
        self.prompts = prompts
        self.held_out = held_out
        # The latest evaluation's record: status.progress keeps showing it in every later report.
        self.last_eval: dict | None = None
        self.reporter = reporter
        self.trackers = trackers
        self.schedule = set(config.inference.schedule(config.trainer.num_train_steps))
        self.timeout_s = config.distributed.barrier_timeout_s
        self.notice = notice or TerminationNotice()
        self.compiles = compiles
        self.profiler = Profiler(config)

    def run(self, stop_at: int | None = None) -> None:
        """Train to the last step (or to `stop_at`, checkpointed there: a preemption drill), pausing on schedule."""
        config, trainer = self.config, self.trainer
        total = config.trainer.num_train_steps
        last = total if stop_at is None else min(stop_at, total)
        every = config.trainer.checkpoint.every
        first_step = True
        while True:
            logs.set_context(step=trainer.step)
            if trainer.step in self.schedule and not self._inference_complete(trainer.step):
                with self.profiler.inference_pause(trainer.step):
                    self.pause_for_inference(trainer.step)
            if trainer.step >= last:
                break
            with self.profiler.train_step(trainer.step + 1):
                record = trainer.train_step()
            logs.set_context(step=trainer.step)
            # train_step_compilations stays 1 across pauses: resuming reuses the compiled step.
            self.trackers.record({"event": "train", **record,
                                  "train_step_compilations": trainer.train_step_compilations})
            if is_leader():
                log.info("step %d: loss %.4f, reward accuracy %.2f, %.2fs", trainer.step, record["loss"],
                         record["rewards/accuracies"], record["step_time"])
            self._report(Progress(stage="train", step=trainer.step, totalSteps=total))
            if first_step:  # this start's train step is compiled (or loaded) now
                self._record_compiles(trainer.step)
                first_step = False
            durable_pause = config.trainer.checkpoint.at_eval and trainer.step in self.schedule
            saved = durable_pause or (every is not None and trainer.step % every == 0) or trainer.step == last
            if saved:
                trainer.save_checkpoint()
                self.trackers.flush()  # what a restart from here would not redo
            if trainer.step < last and self.notice.received_anywhere():  # the same branch on every host
                if not saved:
                    trainer.save_checkpoint()
                trainer.wait_for_checkpoint()
                raise Preempted(f"after step {trainer.step}", trainer.step)
        trainer.wait_for_checkpoint()  # before the process exits
        if trainer.step >= total:  # not after a drill's stop_at
            if self._exports("end"):
                export_hf(trainer.model, export_dir(config.export, None), config.export, self.export_files,
                          self.timeout_s)
            self._report(Progress(stage="done", step=trainer.step, totalSteps=total))

    def pause_for_inference(self, step: int) -> None:
        """Steps 2-5 of a pause (module docstring). Every host runs the same barriers and the one allgather, in
        the same order; only the manifest is the leader's alone, between the gather and the last barrier."""
        started = time.perf_counter()
        barrier(f"infer-{step}-start", self.timeout_s)
        if self._exports("pauses"):  # before the manifest: a completed pause has its copy
            export_hf(self.trainer.model, export_dir(self.config.export, step), self.config.export,
                      self.export_files, self.timeout_s)
        evaluation = self._evaluate(step) if self.held_out is not None else None
        generate_started = time.perf_counter()
        completions = self._generate(step)
        generate_s = time.perf_counter() - generate_started
        rows = self._completion_rows(step, completions)
        write_started = time.perf_counter()
        outputs.write_host_shard(self.config.output_dir, step, jax.process_index(), jax.process_count(), rows)
        write_s = time.perf_counter() - write_started
        barrier(f"infer-{step}-written", self.timeout_s)
        host_stats = self._gather_host_stats(rows, generate_s, write_s)
        if is_leader():
            self._write_manifest(step, host_stats, started, evaluation)
        barrier(f"infer-{step}-done", self.timeout_s)
        self._record_compiles(step)

    def _evaluate(self, step: int) -> dict:
        """The held-out metrics at `step` (every host runs it: the eval program spans the training mesh)."""
        total_steps = self.config.trainer.num_train_steps
        self._report(Progress(stage="eval", step=step, totalSteps=total_steps))
        started = time.perf_counter()
        metrics = self.trainer.evaluate(self.held_out)
        self.last_eval = {"event": "eval", "step": step, **metrics, "seconds": time.perf_counter() - started,
                          "eval_compilations": self.trainer.eval_compilations}
        log.info("held-out evaluation at step %d: %d pairs, loss %.4f, reward accuracy %.3f, margin %.3f, %.1fs",
                 step, metrics["pairs"], metrics["loss"], metrics["rewards/accuracies"], metrics["rewards/margins"],
                 self.last_eval["seconds"])
        self._report(Progress(stage="eval", step=step, totalSteps=total_steps))
        return self.last_eval

    def _generate(self, step: int) -> list[Completion]:
        """This host's completions: its own shard of the prompts (global_mesh: every host runs the whole,
        sharded computation and keeps its shard's rows)."""
        shard = host_shard(len(self.prompts), jax.process_index(), jax.process_count())
        indices = list(range(len(self.prompts))) if self.config.inference.mode == "global_mesh" else list(shard)
        total_steps = self.config.trainer.num_train_steps

        def progress(done: int, tokens: int) -> None:
            # Called after every decode chunk; global_mesh hosts decode together, so they stop together.
            if self.notice.received_anywhere() if self.config.inference.mode == "global_mesh" else self.notice.received:
                raise Preempted(f"during the inference pause at step {step}",
                                self.trainer.checkpointer.latest_step())
            # While decoding, hosts do not talk: the leader reports its own shard; the totals come at the end.
            if not is_leader():
                log.info("inference at step %d: %d/%d prompts done, %d tokens", step, done, len(indices), tokens)
            self._report(Progress(stage="infer", step=step, totalSteps=total_steps,
                                  promptsDone=done, promptsTotal=len(indices), tokens=tokens))

        completions = self.engine.generate(self.trainer.model, [self.prompts.token_ids[i] for i in indices],
                                           indices, step=step, seed=self._seed(), progress=progress)
        return [c for c in completions if c.global_prompt_index in shard]

    def _completion_rows(self, step: int, completions: list[Completion]) -> list[dict]:
        """The JSONL rows of this host's shard, in global prompt order."""
        process_index, process_count = jax.process_index(), jax.process_count()
        return [{
            "step": step,
            "process_index": process_index,
            "process_count": process_count,
            "global_prompt_index": c.global_prompt_index,
            "prompt": self.prompts.texts[c.global_prompt_index],
            "completion": c.text,
            "completion_tokens": len(c.token_ids),
            "finish_reason": c.finish_reason,
        } for c in sorted(completions, key=lambda c: c.global_prompt_index)]

    def _gather_host_stats(self, rows: list[dict], generate_s: float, write_s: float) -> list[dict]:
        """Every host's prompts, tokens and phase times, on every host (a collective: all hosts call it)."""
        tokens = sum(row["completion_tokens"] for row in rows)
        local = np.array([len(rows), tokens, generate_s, write_s], dtype=np.float64)
        gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
        return [{"process_index": i, "prompts": int(r[0]), "completion_tokens": int(r[1]),
                 "generate_seconds": float(r[2]), "write_seconds": float(r[3])} for i, r in enumerate(gathered)]

    def _write_manifest(self, step: int, host_stats: list[dict], started: float, evaluation: dict | None) -> None:
        """The leader's part of a pause: manifest.json (it marks the step complete), then the pause's metrics
        records (written once: a pause redone after a crash had not written them), progress."""
        total_prompts = len(self.prompts)
        phase_seconds = {"generate": max(h["generate_seconds"] for h in host_stats),
                         "write": max(h["write_seconds"] for h in host_stats),
                         "total": time.perf_counter() - started}
        manifest = outputs.build_manifest(self.config.output_dir, step, total_prompts, jax.process_count(),
                                          host_stats, phase_seconds)
        storage.write_atomic(outputs.manifest_path(self.config.output_dir, step),
                             json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if evaluation is not None:
            self.trackers.record(evaluation)
        self.trackers.record({"event": "inference", "step": step, "prompts": total_prompts,
                              "completion_tokens": manifest["completion_tokens"],
                              "finish_reasons": manifest["finish_reasons"],
                              "tokens_per_second": manifest["tokens_per_second"],
                              "phase_seconds": phase_seconds,
                              "engine_compilations": self.engine.compilations})
        if self.trackers.takes_samples:
            self.trackers.samples(step, outputs.sample_rows(self.config.output_dir, step, jax.process_count(),
                                                            SAMPLES_PER_HOST))
        self.trackers.flush()
        log.info("inference at step %d: %d prompts, %d tokens, %.1f tok/s, %.1fs", step, total_prompts,
                 manifest["completion_tokens"], manifest["tokens_per_second"] or 0.0, phase_seconds["total"])
        self._report(Progress(stage="infer", step=step, totalSteps=self.config.trainer.num_train_steps,
                              promptsDone=total_prompts, promptsTotal=total_prompts,
                              tokens=manifest["completion_tokens"]))

    def _inference_complete(self, step: int) -> bool:
        # The leader decides for everyone, so all hosts take the same branch even under eventual consistency.
        done = np.array([outputs.read_manifest(self.config.output_dir, step) is not None if is_leader() else 0],
                        dtype=np.int32)
        return bool(multihost_utils.broadcast_one_to_all(done)[0])

    def _record_compiles(self, step: int) -> None:
        """This process's compiles so far: logged on every host, the leader's in the metrics."""
        if self.compiles is None:
            return
        summary = self.compiles.summary()
        log.info("host %d: compiles after step %d: %d loaded from the persistent cache, %d compiled, %.1fs; %s",
                 jax.process_index(), step, summary["hits"], summary["misses"], summary["compile_seconds"],
                 json.dumps(summary["programs"], sort_keys=True))
        self.trackers.record({"event": "compile_cache", "step": step, **summary})

    def _exports(self, at: str) -> bool:
        return self.config.export.hf_dir is not None and at in self.config.export.at

    def _seed(self) -> int:
        seed = self.config.inference.seed
        return self.config.trainer.seed if seed is None else seed

    def _report(self, progress: Progress) -> None:
        if is_leader():
            if self.last_eval is not None:
                progress = dataclasses.replace(progress, evalStep=self.last_eval["step"],
                                               evalLoss=self.last_eval["loss"],
                                               evalAccuracy=self.last_eval["rewards/accuracies"])
            self.reporter.report(progress)


def check_context(inference: InferenceConfig, context: int, source: str | None) -> None:
    """A request the model's context cannot hold fails at start, not at the first pause. (For random-init and
    built-in models the config rules refuse it before any pod starts; a checkpoint's context is known only here.)"""
    if inference.enabled and inference.max_prompt_len + inference.max_new_tokens > context:
        raise ConfigError(f"inference.max_new_tokens: max_prompt_len {inference.max_prompt_len} + max_new_tokens "
                          f"{inference.max_new_tokens} exceeds the context of {source or 'the model'} "
                          f"(max_position_embeddings {context})")


def build_run(config: WorkerConfig, reporter: ProgressReporter | None = None,
              notice: TerminationNotice | None = None, compiles: CompileLog | None = None) -> InterleavedRun:
    """Everything a host needs, checked before the first train step: output dir, tokenizer, prompts, model."""
    outputs.check_writable(config.output_dir, jax.process_index())
    if config.export.hf_dir is not None:
        storage.check_writable(config.export.hf_dir, f"process_{jax.process_index()}")
    tokenizer = load_tokenizer(config.tokenizer or config.model.source)
    prompts = load_prompts(config.inference, tokenizer) if config.inference.enabled else PromptSet([], [])
    mesh = make_mesh(config.trainer.mesh, slices=num_slices())
    log.info("mesh %s over %d slice(s)", " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items()),
             num_slices())
    model = load_model(config.model, mesh)  # every param made on its training sharding
    check_context(config.inference, model.config.max_position_embeddings, config.model.source)
    trainer = Trainer(config, model, tokenizer, mesh)
    del model  # donated into the training state
    held_out = (PreferenceData(config.data, tokenizer, config.data.eval_files, config.trainer.batch_size,
                               config.trainer.seed) if config.data.eval_files else None)
    engine = Engine(trainer.model.config, config.inference, tokenizer.eos_token_ids,
                    compute_dtype=COMPUTE_DTYPES[config.trainer.compute_dtype], mesh=trainer.mesh,
                    tokenizer=tokenizer)
    export_files = (tokenizer_files(config.tokenizer or config.model.source, tokenizer)
                    if config.export.hf_dir is not None else None)
    return InterleavedRun(config, trainer, engine, prompts, reporter or reporter_from_env(),
                          open_trackers(config), held_out, notice, compiles, export_files)
