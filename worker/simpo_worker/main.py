"""`simpo-interleave worker`: what each pod runs. Trains from a YAML config, resuming from the newest checkpoint.

Exit codes: 0 done; 10 bad config, 11 bad data, 12 bad or missing model, 13 output dir unusable (no restart can
fix these); anything else is retryable and the restarted worker resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os

from simpo_worker.config import WorkerConfig, load_worker_config
from simpo_worker.distributed import initialize_from_env
from simpo_worker.errors import ConfigError
from simpo_worker.metrics import MetricsWriter
from simpo_worker.pretrained import load_model
from simpo_worker.tokenizer import load_tokenizer
from simpo_worker.trainer import Trainer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("SIMPO_CONFIG"),
                        help="worker config YAML, local or fsspec URL (default: $SIMPO_CONFIG)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and exit once this step is reached (a preemption drill; the next start "
                             "resumes)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.config:
        raise ConfigError("no worker config: pass --config or set SIMPO_CONFIG")
    config = load_worker_config(args.config)
    initialize_from_env(config.distributed.init_timeout_s)
    tokenizer = load_tokenizer(config.tokenizer or config.model.source)
    trainer = Trainer(config, load_model(config.model), tokenizer)
    metrics = MetricsWriter(config.output_dir)
    resumed = trainer.restore_latest()
    metrics.discard_after(resumed or 0)
    log.info("training from step %d to %d", trainer.step, config.trainer.num_train_steps)
    train(config, trainer, metrics, stop_at=args.stop_at_step)
    return 0


def train(config: WorkerConfig, trainer: Trainer, metrics: MetricsWriter, stop_at: int | None = None) -> None:
    """Train to the last step (or `stop_at`), checkpointing every `checkpoint.every` steps and at the end."""
    total = config.trainer.num_train_steps
    last = total if stop_at is None else min(stop_at, total)
    every = config.trainer.checkpoint.every
    while trainer.step < last:
        record = trainer.train_step()
        metrics.write({"event": "train", **record, "train_step_compilations": trainer.train_step_compilations})
        log.info("step %d: loss %.4f, reward accuracy %.2f, %.2fs", trainer.step, record["loss"],
                 record["rewards/accuracies"], record["step_time"])
        if trainer.step == last or (every is not None and trainer.step % every == 0):
            trainer.save_checkpoint()
