"""`simpo-interleave worker`: what each pod runs. Trains from a YAML config, pausing for inference on schedule,
resuming from the newest complete checkpoint after a restart.

Exit codes: 0 done; 3 stopped on SIGTERM after checkpointing (simpo_worker.preemption); 10 bad config, 11 bad data, 12 bad or missing model, 13 output dir unusable, 14 out of device
memory (no restart can fix these); anything else is retryable and the restarted worker resumes from its newest
complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os

import fsspec
import jax

from simpo_worker.contract.api import ENV_CONFIG, ExitCode
from simpo_worker.contract.config import WorkerConfig, parse_worker_config_yaml
from simpo_worker.contract.errors import ConfigError, NonRetryableError, is_out_of_memory
from simpo_worker.interleave import build_run
from simpo_worker.observe import logs
from simpo_worker.parallel import compile_cache
from simpo_worker.parallel.distributed import exit_now, initialize_from_env
from simpo_worker.preemption import Preempted, TerminationNotice, disable_jax_preemption_service

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get(ENV_CONFIG),
                        help="worker config YAML, local or fsspec URL (default: $SIMPO_CONFIG)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and exit once this step is reached (a preemption drill; the next start "
                             "resumes)")


def load_worker_config(file: str) -> WorkerConfig:
    """Read a YAML worker config from a local path or fsspec URL."""
    if "://" in file:
        with fsspec.open(file, "r") as handle:
            return parse_worker_config_yaml(handle.read(), file)
    try:
        with open(file, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(f"{file}: cannot read config: {error}") from error
    return parse_worker_config_yaml(text, file)


def run(args: argparse.Namespace) -> int:
    logs.configure()
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO chatter
    if not args.config:
        raise ConfigError("no worker config: pass --config or set SIMPO_CONFIG")
    config = load_worker_config(args.config)
    disable_jax_preemption_service()
    initialize_from_env(config.distributed.init_timeout_s)
    logs.set_context(host=jax.process_index())
    compiles = compile_cache.enable(config)
    notice = TerminationNotice().install()
    try:
        interleaved = build_run(config, notice=notice, compiles=compiles)
        with interleaved.trackers:  # closed however the run ends
            resumed = interleaved.trainer.restore_latest()
            interleaved.trackers.start(resumed or 0)
            log.info("host %d of %d: training from step %d to %d", jax.process_index(), jax.process_count(),
                     interleaved.trainer.step, config.trainer.num_train_steps)
            interleaved.run(stop_at=args.stop_at_step)
    except Preempted as error:
        log.warning("host %d: %s (exit %d)", jax.process_index(), error, ExitCode.PREEMPTED)
        exit_now(ExitCode.PREEMPTED)
    except NonRetryableError as error:
        log.error("%s: %s", type(error).__name__, error)
        exit_now(error.exit_code)
    except BaseException as error:  # noqa: BLE001 - report, then exit without jax.distributed's shutdown barrier
        log.error("host %d failed: %s", jax.process_index(), error, exc_info=True)  # one entry, traceback included
        if is_out_of_memory(error):
            # A compile or an allocation did not fit the devices: the restarted job would fail the same way.
            log.error("out of device memory (exit %d, not retried): run `simpo-interleave plan` on the job to see "
                      "which program does not fit and the config knobs that shrink it", ExitCode.OUT_OF_MEMORY)
            exit_now(ExitCode.OUT_OF_MEMORY)
        exit_now(ExitCode.RETRYABLE)
    return 0
